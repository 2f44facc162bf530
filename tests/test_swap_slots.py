"""Swap slots (mm/swapfile.c), VMA and cluster readahead (mm/swap_state.c) and plug merging
of contiguous slots into one request (block/blk-merge.c)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from apfsim.engine import Engine
from apfsim.host.backing import ConstantServiceTime, SwapDevice
from apfsim.host.io import HostMemoryIo
from apfsim.host.memory import MAX_REQUEST_PAGES, GuestMemory
from apfsim.ports import RunCounters
from apfsim.scenario import SwapConfig, scenario_from_dict
from apfsim.simulation import Simulation

sys.path.insert(0, str(Path(__file__).parent))
from memory_helpers import IO, M, S, U, gfns


def resident(n_pages: int, swap_cluster: int = 4, **kw: Any) -> GuestMemory:
    """Every page mapped, dirty and unreferenced, without a slot; no limit pressure."""
    mem = GuestMemory(n_pages, n_pages, swap_cluster=swap_cluster, reclaim_batch=1, **kw)
    mem.state[:] = M
    mem.dirty[:] = 1
    mem.resident = n_pages
    return mem


def swapped_in_order(n_pages: int, order: list[int], **kw: Any) -> GuestMemory:
    """Pages of ``order`` swapped out one after another (so holding slots 0, 1, ...)."""
    mem = GuestMemory(n_pages, n_pages, **kw)
    mem.state[order] = S
    mem.alloc_swap(np.array(order, dtype=np.int64))
    return mem


# ---------------------------------------------------------------------- slot allocation


def test_consecutive_evictions_get_ascending_slots_then_a_new_cluster() -> None:
    mem = resident(16, swap_cluster=4)
    rec = mem.reclaim(3)  # CLOCK from gfn 0: 0, 1, 2
    assert rec.writes.tolist() == [0, 1, 2]
    assert mem.slot[:3].tolist() == [0, 1, 2]
    # The next eviction takes the cluster's last slot, then cluster 1 from the free list.
    mem.reclaim(3)
    assert mem.slot[3:6].tolist() == [3, 4, 5]
    assert mem.owner[:6].tolist() == [0, 1, 2, 3, 4, 5]
    mem.check()


def test_write_fault_frees_the_slot_and_readahead_pages_keep_theirs() -> None:
    mem = swapped_in_order(16, list(range(8)), page_cluster=2)
    mem.ra_hits = 2  # hits + 2 = 4: a four-slot window
    window = mem.readahead_window(1)
    assert window.tolist() == [1, 0, 2, 3]
    mem.start_read(window)
    mem.finish_read(window)
    assert mem.map_after_read(1)  # the faulting page: FOLL_WRITE frees its slot
    assert mem.slot[[0, 1, 2, 3]].tolist() == [0, -1, 2, 3]
    assert mem.owner[1] == -1
    mem.map_swapcache(2)  # a later write fault on a readahead page frees its slot too
    assert mem.slot[2] == -1
    # Pages 0 and 3 were never touched: reclaim drops them without a write, slot kept.
    mem.referenced[:] = 0
    rec = mem.reclaim(4)
    assert sorted(rec.writes.tolist()) == [1, 2]
    assert mem.slot[[0, 3]].tolist() == [0, 3]
    mem.check()


def test_redirtied_page_is_written_to_a_new_slot() -> None:
    mem = resident(8, swap_cluster=4)
    mem.reclaim(1)
    assert mem.slot[0] == 0
    mem.start_read(gfns(0))
    mem.finish_read(gfns(0))
    mem.map_after_read(0)
    mem.referenced[:] = 0
    mem._hand = 0
    assert mem.reclaim(1).writes.tolist() == [0]
    assert mem.slot[0] == 1  # slot 0 was freed; the cluster cursor only moves up
    assert mem.owner[0] == -1
    mem.check()


def test_emptied_cluster_returns_to_the_free_list_tail() -> None:
    mem = resident(16, swap_cluster=4, swap_slots=16)
    mem.reclaim(4)  # cluster 0 filled and dropped
    for gfn in range(4):
        mem.start_read(gfns(gfn))
        mem.finish_read(gfns(gfn))
        mem.map_after_read(gfn)
    assert list(mem._free_clusters) == [1, 2, 3, 0]
    mem.referenced[:] = 0
    mem.reclaim(9)  # gfns 4..12: clusters 1 and 2, then gfn 12 in cluster 3
    assert mem.slot[4:13].tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    mem.check()


def test_no_free_cluster_falls_back_to_a_first_fit_scan() -> None:
    mem = resident(8, swap_cluster=4, swap_slots=8)
    mem.reclaim(7)  # slots 0..6: cluster 0 dropped, cluster 1 the per-CPU one
    for gfn in (1, 5):  # free one slot in each cluster: neither becomes free
        mem.start_read(gfns(gfn))
        mem.finish_read(gfns(gfn))
        mem.map_after_read(gfn)
    mem.reclaim(1)  # gfn 7 takes slot 7: cluster 1 is used up, no cluster is free
    assert mem.slot[7] == 7 and not mem._free_clusters
    mem.referenced[:] = 0
    mem._hand = 1
    mem.reclaim(1)  # gfn 1 again: first fit from the scan cursor finds slot 1
    assert mem.slot[1] == 1
    mem._hand = 5
    mem.reclaim(1)
    assert mem.slot[5] == 5
    mem.check()


def test_initial_swapped_pages_hold_slots_in_gfn_order() -> None:
    mem = GuestMemory(512, 512)
    mem.initialise(np.random.default_rng(3), 0.25, 0.5)
    swapped = np.flatnonzero(mem.state == S)
    assert mem.slot[swapped].tolist() == list(range(len(swapped)))
    assert (mem.slot[mem.state != S] == -1).all()
    mem.check()


# ---------------------------------------------------------------------- readahead windows

# gfns 0..3 and 10..13 evicted alternately: gfn 0 -> slot 0, 10 -> 1, 1 -> 2, 11 -> 3, ...
INTERLEAVED = [0, 10, 1, 11, 2, 12, 3, 13]


def test_vma_window_is_virtual_neighbours_cluster_window_is_slot_neighbours() -> None:
    vma = swapped_in_order(64, INTERLEAVED, readahead="vma", page_cluster=2)
    cluster = swapped_in_order(64, INTERLEAVED, readahead="cluster", page_cluster=2)
    for mem in (vma, cluster):
        mem.ra_hits = 2  # a four-page window
    # VMA: centred on gfn 1 (left = 1): gfns 0..3, wherever their slots are.
    assert vma.readahead_window(1).tolist() == [1, 0, 2, 3]
    # Cluster: gfn 1 is slot 2; the aligned block of slots 0..3 holds gfns 0, 10, 1, 11.
    assert cluster.readahead_window(1).tolist() == [1, 0, 10, 11]


def test_vma_window_direction_and_pmd_clamp() -> None:
    mem = swapped_in_order(1024, list(range(1024)), readahead="vma", page_cluster=3)
    assert mem.vma_window(100, 8, prev=99).tolist() == list(range(100, 108))  # forward
    assert mem.vma_window(100, 8, prev=101).tolist() == [100, *range(93, 100)]  # backward
    assert mem.vma_window(100, 8, prev=50).tolist() == [100, *range(97, 100), *range(101, 105)]
    # Never across the 2 MiB region (512 pages) of the fault.
    assert mem.vma_window(511, 8, prev=510).tolist() == [511]
    assert mem.vma_window(512, 8, prev=513).tolist() == [512]
    # Untouched, mapped and in-flight pages are skipped; only swap entries are read.
    mem.state[[101, 102, 103]] = [U, M, IO]
    assert mem.vma_window(100, 8, prev=99).tolist() == [100, 104, 105, 106, 107]


def test_vma_window_is_capped_at_the_order_ceiling() -> None:
    mem = swapped_in_order(1024, list(range(1024)), readahead="vma", page_cluster=6)
    mem.ra_hits = 63
    assert mem.vma_nr_pages(300) == 32  # 1 << min(6, SWAP_RA_ORDER_CEILING)
    cluster = swapped_in_order(1024, list(range(1024)), readahead="cluster", page_cluster=6)
    cluster.ra_hits = 63
    assert cluster.swapin_nr_pages(300) == 64


def test_vma_window_ramps_on_sequential_faults() -> None:
    mem = swapped_in_order(64, list(range(64)), readahead="vma", page_cluster=3)
    assert mem.readahead_window(10).tolist() == [10]  # no history: one page
    window = mem.readahead_window(11)  # next to the last fault: 2 pages, forward
    assert window.tolist() == [11, 12]


# ---------------------------------------------------------------------- merging


def test_only_contiguous_slots_form_one_request() -> None:
    mem = swapped_in_order(64, INTERLEAVED)
    scattered = mem.requests(gfns(1, 0, 2, 3))  # slots 2, 0, 4, 6
    assert [p.tolist() for p in scattered] == [[0], [1], [2], [3]]
    contiguous = mem.requests(gfns(1, 0, 10, 11))  # slots 2, 0, 1, 3
    assert [p.tolist() for p in contiguous] == [[1, 0, 10, 11]]
    runs = mem.requests(gfns(0, 10, 2, 12))  # slots 0, 1 and 4, 5
    assert [p.tolist() for p in runs] == [[0, 10], [2, 12]]


def test_a_run_longer_than_the_request_limit_is_split() -> None:
    n = MAX_REQUEST_PAGES + 3
    mem = swapped_in_order(n, list(range(n)))
    parts = mem.requests(np.arange(n, dtype=np.int64))
    assert [len(p) for p in parts] == [MAX_REQUEST_PAGES, 3]


def io_over(mem: GuestMemory, per_page_ns: int) -> tuple[Engine, SwapDevice, HostMemoryIo]:
    eng = Engine()
    dev = SwapDevice(eng, ConstantServiceTime(100), ConstantServiceTime(100), 1, per_page_ns)
    return eng, dev, HostMemoryIo(eng, mem, dev, 0, RunCounters())


@pytest.mark.parametrize(
    ("readahead", "requests", "ready"),
    [
        # VMA: gfns 0..3 sit in slots 0, 2, 4, 6: four requests, served one at a time.
        ("vma", 4, {0: 100, 1: 200, 2: 300, 3: 400}),
        # Cluster: slots 0..3 (gfns 0, 10, 1, 11) are one request: 100 + 3 * 10 ns.
        ("cluster", 1, {0: 130, 1: 130, 10: 130, 11: 130}),
    ],
)
def test_each_page_is_ready_when_its_request_completes(
    readahead: str, requests: int, ready: dict[int, int]
) -> None:
    mem = swapped_in_order(64, INTERLEAVED, readahead=readahead, page_cluster=2)
    mem.ra_hits = 2
    eng, dev, io = io_over(mem, per_page_ns=10)
    io.submit_swapin(1)
    assert dev.queue_length == requests
    done: dict[int, int] = {}
    for gfn in ready:
        io.read_page(gfn, lambda g: done.setdefault(g, eng.now), gfn)
    eng.run(until=10_000)
    assert done == ready
    assert (dev.reads, dev.pages_read) == (requests, 4)


def test_write_back_is_one_request_per_slot_run() -> None:
    mem = resident(16, swap_cluster=4)
    mem.alloc_swap(gfns(5))  # gfn 5 already holds slot 0 (dirty: rewritten in place)
    eng, dev, io = io_over(mem, per_page_ns=0)
    mem.referenced[:] = 0
    io.write_back(mem.reclaim(4))  # gfns 0..3 take slots 1..4: one run
    mem._hand = 5
    io.write_back(mem.reclaim(1))  # gfn 5 rewritten to slot 0
    eng.run(until=10_000)
    assert (dev.writes, dev.pages_written) == (2, 5)
    assert mem.slot[[0, 1, 2, 3, 5]].tolist() == [1, 2, 3, 4, 0]


# ---------------------------------------------------------------------- scenario keys


def test_readahead_auto_follows_swap_use_vma_readahead() -> None:
    assert SwapConfig().readahead_mode() == "cluster"  # a rotating disk by default
    assert SwapConfig(rotational=False).readahead_mode() == "vma"
    assert SwapConfig(rotational=False, readahead="cluster").readahead_mode() == "cluster"
    with pytest.raises(ValidationError, match="readahead"):
        SwapConfig.model_validate({"readahead": "both"})


@pytest.mark.parametrize("readahead", ["vma", "cluster"])
def test_slot_maps_stay_consistent_through_a_run(readahead: str) -> None:
    """A random writer over three times the host limit under x86: every slot has one owner, every
    swapped page a slot, the cluster counts and free list agree (``GuestMemory.check``)."""
    sc = scenario_from_dict(
        {
            "duration_s": 0.3,
            "guest": {"vcpus": 1, "memory_mib": 64, "reserved_mib": 4},
            "host": {"memory_limit_mib": 16, "swap": {"readahead": readahead}},
            "initial_memory": {"resident_fraction": 0.25, "swapped_fraction": 0.7},
            "tasks": [{"kind": "random_writer", "buffer_mib": 48}],
        }
    )
    sim = Simulation(sc, "x86", seed=4)
    result = sim.run()
    mem = sim.memory
    mem.check()
    assert result.faults["needs_io"] > 100 and mem.pages_evicted > 100
    assert mem.readahead == readahead
