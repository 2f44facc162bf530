"""Per-page host state: bytes per guest page, and the cost of the vectorised page operations.

    python benchmarks/bench_memory.py
    python -m pytest benchmarks -p no:cacheprovider --benchmark-only -o python_files='bench_*.py'

Target (issue 2): <= 16 bytes of host state per guest page. A 64 GiB guest is not allocated:
a 1 GiB one is, and its array sizes are scaled by 64 (all per-page state is in flat arrays).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from apfsim.host.memory import GuestMemory

TARGET_BYTES_PER_PAGE = 16
PAGES_PER_GIB = 1 << 18  # 4 KiB pages
BATCH = 2048  # the workloads' plan batch (workloads/tasks.py _BATCH)


def per_page_arrays(mem: GuestMemory) -> dict[str, np.ndarray]:
    """Every per-page and per-swap-slot numpy array of ``mem`` (found by shape, so new ones
    are counted too)."""
    out = {}
    for name in type(mem).__slots__:
        value = getattr(mem, name, None)
        if isinstance(value, np.ndarray) and value.shape in ((mem.n_pages,), (mem.n_slots,)):
            out[name] = value
    return out


def bytes_per_page() -> tuple[int, int]:
    """(bytes of per-page and per-slot state per guest page, bytes a 64 GiB guest needs)
    from a 1 GiB GuestMemory (its swap area is whole clusters: no rounding)."""
    mem = GuestMemory(PAGES_PER_GIB, PAGES_PER_GIB // 2)
    arrays = per_page_arrays(mem)
    total_1gib = sum(a.nbytes for a in arrays.values())
    per_page = total_1gib // mem.n_pages
    assert per_page == mem.bytes_per_page()
    return per_page, 64 * total_1gib


def resident_memory(fraction: float = 0.9) -> GuestMemory:
    mem = GuestMemory(PAGES_PER_GIB, PAGES_PER_GIB)
    mem.initialise(np.random.default_rng(0), fraction, 1.0 - fraction)
    return mem


def first_not_mapped_inputs() -> dict[str, tuple[GuestMemory, np.ndarray]]:
    """A random-writer batch (random pages, ~90 % mapped) and a memory-hog batch (all mapped)."""
    random_mem = resident_memory(0.9)
    random_pages = np.random.default_rng(1).integers(0, PAGES_PER_GIB, size=BATCH)
    hog_mem = resident_memory(1.0)
    hog_pages = np.arange(BATCH, dtype=np.int64)
    return {
        "random batch": (random_mem, random_pages),
        "sequential, all mapped": (hog_mem, hog_pages),
    }


def reclaim_memory(referenced: bool) -> GuestMemory:
    """Half the 1 GiB guest resident (at the limit), the rest swapped; optionally all referenced."""
    mem = GuestMemory(PAGES_PER_GIB, PAGES_PER_GIB // 2)
    mem.initialise(np.random.default_rng(0), 0.5, 0.5)
    if referenced:
        mem.referenced[:] = 1
    return mem


def per_call_s(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


# -- pytest-benchmark --------------------------------------------------------------------------


def test_first_not_mapped_random_batch(benchmark: Any) -> None:
    mem, pages = first_not_mapped_inputs()["random batch"]
    assert benchmark(mem.first_not_mapped, pages) < BATCH


def test_first_not_mapped_sequential(benchmark: Any) -> None:
    mem, pages = first_not_mapped_inputs()["sequential, all mapped"]
    assert benchmark(mem.first_not_mapped, pages) == BATCH


def test_reclaim_32_pages(benchmark: Any) -> None:
    mem = reclaim_memory(referenced=False)
    # 2000 calls at most evict 64000 of the 131072 resident pages: always something to take.
    benchmark.pedantic(mem.reclaim, args=(32,), rounds=2000, iterations=1)


def test_bytes_per_page(benchmark: Any) -> None:
    per_page, total = benchmark(bytes_per_page)
    benchmark.extra_info.update(bytes_per_page=per_page, mib_for_64_gib=total / 2**20)
    assert per_page <= TARGET_BYTES_PER_PAGE


def main() -> None:
    per_page, total = bytes_per_page()
    verdict = "ok" if per_page <= TARGET_BYTES_PER_PAGE else "ABOVE TARGET"
    names = ", ".join(per_page_arrays(GuestMemory(8, 8)))
    print(f"host page state: {per_page} B/page ({names}); target <= 16  {verdict}")
    print(f"  64 GiB guest: {total / 2**20:.0f} MiB of page state (scaled from 1 GiB)")
    for label, (mem, pages) in first_not_mapped_inputs().items():
        cost = per_call_s(partial(mem.first_not_mapped, pages), 20_000)
        print(
            f"first_not_mapped, {BATCH} pages, {label}: {cost * 1e6:.2f} us/call "
            f"({cost * 1e9 / BATCH:.2f} ns/page)"
        )
    for referenced in (False, True):
        mem = reclaim_memory(referenced)
        cost = per_call_s(partial(mem.reclaim, 32), 2000)
        label = "all referenced (second chance first)" if referenced else "none referenced"
        print(f"reclaim(32) on 1 GiB, {label}: {cost * 1e6:.2f} us/call")


if __name__ == "__main__":
    main()
