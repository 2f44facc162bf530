"""Per-page host state: bytes per guest page, and the cost of the vectorised operations.

    python benchmarks/bench_memory.py

Target (issue 2): <= 16 bytes per guest page (a 64 GiB guest's state fits in 256 MiB).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from apfsim.host.memory import GuestMemory

PAGES_PER_GIB = 1 << 18


def bytes_per_page() -> int:
    mem = GuestMemory(PAGES_PER_GIB, PAGES_PER_GIB // 2)
    return sum(a.itemsize for a in (mem.state, mem.referenced, mem.dirty, mem.swap_copy))


def first_not_mapped_cost(batch: int = 2048, rounds: int = 20_000) -> float:
    mem = GuestMemory(PAGES_PER_GIB, PAGES_PER_GIB)
    mem.initialise(np.random.default_rng(0), 0.9, 0.1)
    pages = np.random.default_rng(1).integers(0, PAGES_PER_GIB, size=batch)
    t0 = time.perf_counter()
    for _ in range(rounds):
        mem.first_not_mapped(pages)
    return (time.perf_counter() - t0) / rounds


def reclaim_cost(rounds: int = 2_000) -> float:
    mem = GuestMemory(PAGES_PER_GIB, PAGES_PER_GIB // 2)
    mem.initialise(np.random.default_rng(0), 0.5, 0.5)
    t0 = time.perf_counter()
    for _ in range(rounds):
        mem.reclaim(32)
    return (time.perf_counter() - t0) / rounds


def test_first_not_mapped(benchmark: Any) -> None:
    mem = GuestMemory(PAGES_PER_GIB, PAGES_PER_GIB)
    pages = np.arange(2048, dtype=np.int64)
    benchmark(mem.first_not_mapped, pages)


if __name__ == "__main__":
    per_page = bytes_per_page()
    print(
        f"host page state: {per_page} bytes/page; a 64 GiB guest needs "
        f"{per_page * 64 * PAGES_PER_GIB / 2**20:.0f} MiB"
    )
    print(f"first_not_mapped over 2048 random pages: {first_not_mapped_cost() * 1e6:.2f} us")
    print(f"reclaim of 32 pages (CLOCK): {reclaim_cost() * 1e6:.2f} us")
