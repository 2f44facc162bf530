"""Postcopy's destination (apfsim.host.postcopy): the request path, the background stream,
the uffd wait queue and UFFDIO_COPY placement (QEMU migration/ram.c, postcopy-ram.c; Linux
fs/userfaultfd.c)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apfsim.engine import Engine
from apfsim.host.memory import GuestMemory, PageState
from apfsim.host.postcopy import (
    PAGE_HEADER_BYTES,
    TARGET_PAGE,
    PostcopyDestination,
    PostcopyParams,
)
from apfsim.scenario import PostcopyConfig, scenario_from_dict
from apfsim.simulation import Simulation

REMOTE, PLACED = int(PageState.REMOTE), int(PageState.PLACED)


def params(**kw: Any) -> PostcopyParams:
    """The scenario defaults (PostcopyConfig), overridden by ``kw``."""
    base = PostcopyParams.of(PostcopyConfig(enabled=True), vcpus=1)
    return dataclasses.replace(base, **kw)


def destination(
    n_pages: int, p: PostcopyParams, zero: np.ndarray | None = None
) -> tuple[Engine, GuestMemory, PostcopyDestination]:
    eng = Engine()
    mem = GuestMemory(n_pages, n_pages)
    mem.initialise_remote()
    if zero is None:
        zero = np.zeros(n_pages, dtype=np.bool_)
    return eng, mem, PostcopyDestination(eng, mem, p, zero)


def transfer_ns(p: PostcopyParams, nbytes: int) -> int:
    return max(1, round(nbytes * p.ns_per_byte))


def test_idle_link_latency_is_the_request_path_rtt_transfer_and_copy() -> None:
    """No background stream, nothing else on the link: a blocked thread waits for exactly
    its enqueue, the fault thread's read, the request's send and crossing, the source's
    return path, the page's transfer and crossing, UFFDIO_COPY (and its wake walk of the one
    waiter) and the wake-up."""
    p = params(background=False)
    eng, mem, dest = destination(64, p)
    woke: list[int] = []
    eng.at(1_000, lambda _: dest.wait(7, 0, lambda _: woke.append(eng.now), None))
    eng.run(until=10**9)
    page = TARGET_PAGE + PAGE_HEADER_BYTES
    expected = (
        1_000
        + p.uffd_lock_ns
        + p.fault_read_ns
        + p.request_send_ns
        + p.one_way_ns
        + p.source_request_ns
        + transfer_ns(p, page)
        + p.one_way_ns
        + p.uffdio_copy_ns
        + p.copy_ns_per_page
        + p.wake_entry_ns  # the one waiter on the uffd
        + p.wakeup_ns
    )
    assert woke == [expected]
    assert mem.state[7] == PLACED and mem.resident == 1
    assert int(np.count_nonzero(mem.state == REMOTE)) == 63
    assert dest.stats.requests_sent == 1 and dest.stats.pages_requested == 1
    # Request -> placed: from the fault thread's read to the end of the copy.
    assert dest.latency.values.tolist() == [
        expected - p.wakeup_ns - 1_000 - p.uffd_lock_ns - p.fault_read_ns
    ]


def test_background_pages_need_no_request() -> None:
    """A page the stream has placed is found by the NOWAIT check (settle): no wait, no
    message, no request."""
    p = params()
    eng, _, dest = destination(256, p)
    eng.run(until=50_000_000)  # 1 MiB at 10 Gb/s is under 1 ms
    assert dest.complete
    assert dest.settle(100)
    done: list[int] = []
    dest.wait(100, 0, lambda _: done.append(eng.now), None)
    eng.run(until=eng.now + 1)
    assert done and dest.stats.requests_sent == 0 and dest.stats.faults_blocked == 0
    assert dest.stats.pages_background == 256 and dest.stats.pages_requested == 0


def test_stream_sends_ram_order_and_zero_pages_small() -> None:
    """The scan sends host pages in RAM order; a zero page is its 9-byte record."""
    p = params()
    zero = np.zeros(128, dtype=np.bool_)
    zero[64:] = True
    eng, _, dest = destination(128, p, zero)
    eng.run(until=10**9)
    order = np.argsort(dest.placed_ns, kind="stable")
    assert order.tolist() == list(range(128))
    assert dest.stats.zero_pages == 64
    assert dest.stats.bytes_main == 64 * (TARGET_PAGE + PAGE_HEADER_BYTES) + 64 * 9


def test_request_waits_behind_the_socket_buffer_without_preempt() -> None:
    """On the one migration stream a requested page queues behind what the background scan
    already put in the socket: about buffer_bytes at link speed; postcopy-preempt sends it on
    its own channel, sharing only the link, so it is far quicker."""
    n = 1 << 14  # 64 MiB: the stream is still busy when the fault comes
    late: dict[bool, int] = {}
    for preempt in (False, True):
        p = params(preempt=preempt)
        eng, _, dest = destination(n, p)
        eng.run(until=5_000_000)
        woke: list[int] = []
        t0 = eng.now
        dest.wait(n - 5, 0, lambda _, e=eng, w=woke: w.append(e.now), None)
        eng.run(until=10**9)
        late[preempt] = woke[0] - t0
    buffer_ns = transfer_ns(params(), params().buffer_bytes)
    assert late[False] >= buffer_ns
    assert late[True] < buffer_ns / 10


def test_huge_page_is_fetched_and_placed_whole() -> None:
    """A 2 MiB host page: one request, every one of its 512 gfns placed at once."""
    p = params(background=False, host_page_pages=512)
    eng, mem, dest = destination(2048, p)
    woke: list[int] = []
    dest.wait(600, 0, lambda _: woke.append(eng.now), None)
    eng.run(until=10**9)
    assert len(woke) == 1
    assert (mem.state[512:1024] == PLACED).all() and (mem.state[:512] == REMOTE).all()
    assert woke[0] >= transfer_ns(p, 512 * (TARGET_PAGE + PAGE_HEADER_BYTES))


def test_page_placed_twice_is_an_error() -> None:
    p = params(background=False)
    _, _, dest = destination(8, p)
    one = np.array([3], dtype=np.int64)
    dest._placed(one, np.array([10], dtype=np.int64))
    with pytest.raises(RuntimeError, match=r"host pages \[3\] placed twice"):
        dest._placed(one, np.array([20], dtype=np.int64))


def test_wake_walk_charges_every_waiter_of_the_one_uffd() -> None:
    """QEMU's one uffd: with k threads asleep on it, a placement walks all k (the
    wait-queue cost the annotated-memory-fault series names)."""
    p = params(background=False)
    eng, _, dest = destination(64, p)
    for g in range(10):
        dest.wait(g, 0, lambda _: None, None)
    eng.run(until=10**9)
    assert dest.stats.wake_walks == 10
    # Waiters leave as they are woken: 10 + 9 + ... + 1 entries.
    assert dest.stats.entries_walked == sum(range(1, 11))


@settings(max_examples=40, deadline=None)
@given(
    faults=st.lists(
        st.tuples(st.integers(0, 2_000_000), st.integers(0, 255), st.integers(0, 3)),
        min_size=1,
        max_size=40,
    ),
    preempt=st.booleans(),
    background=st.booleans(),
    huge=st.booleans(),
    local=st.booleans(),
)
def test_every_wait_completes_once_after_its_page_and_no_page_twice(
    faults: list[tuple[int, int, int]], preempt: bool, background: bool, huge: bool, local: bool
) -> None:
    """Any interleaving of faults from several threads: each wait ends exactly once, after
    its host page is placed; no host page is placed twice (``_placed`` raises); with the
    background stream every page ends up placed."""
    p = params(
        preempt=preempt,
        background=background,
        host_page_pages=16 if huge else 1,
        source="local" if local else "network",
        uffds=4 if local else 1,
        frame_bytes=16 * 1024,
    )
    eng, mem, dest = destination(256, p)
    ends: dict[int, list[int]] = {}
    for i, (t, gfn, thread) in enumerate(faults):

        def fault(_: object, i: int = i, gfn: int = gfn, thread: int = thread) -> None:
            ends[i] = []
            dest.wait(gfn, thread, lambda _: ends[i].append(eng.now), None)

        eng.at(t, fault)
    eng.run(until=10**10)
    hp = p.host_page_pages
    for i, (_, gfn, _) in enumerate(faults):
        assert len(ends[i]) == 1
        placed = int(dest.placed_ns[gfn // hp])
        assert 0 <= placed <= ends[i][0]
        assert mem.state[gfn] == PLACED
    if background and not local:
        assert dest.complete and not (mem.state == REMOTE).any()
    mem.check()


# ---------------------------------------------------------------------- in a simulation


def postcopy_scenario(**pc: Any) -> dict[str, Any]:
    return {
        "name": "postcopy-test",
        "duration_s": 0.5,
        "guest": {"vcpus": 2, "memory_mib": 64, "reserved_mib": 0},
        "host": {"memory_limit_mib": 64},
        "initial_memory": {"resident_fraction": 0.75},
        "postcopy": {"enabled": True, **pc},
        "tasks": [{"kind": "random_writer", "buffer_mib": 32, "count": 2}],
    }


@pytest.mark.parametrize(
    "protocol", ["sync", "x86", "arm64-sdei-ppi", "halt-only", "memory-fault-exit"]
)
def test_simulation_migrates_every_page_under_each_design(protocol: str) -> None:
    scenario = scenario_from_dict(postcopy_scenario())
    result = Simulation(scenario, protocol, seed=1).run()
    pc = result.postcopy
    assert pc is not None
    assert pc["host_pages_left"] == 0 and pc["migration_time_s"] is not None
    assert pc["pages_requested"] + pc["pages_background"] == pc["host_pages"]
    assert result.faults["needs_io"] > 0
    if protocol == "sync":
        assert pc["faults_blocked"] >= result.faults["needs_io"]
    elif protocol == "memory-fault-exit":
        # Every fault on a remote page exits to the vCPU thread; nothing sleeps on the uffd.
        assert pc["faults_blocked"] == 0
        assert pc["user_fetches"] == result.apf["user_exits"] == result.faults["needs_io"]
    else:
        # The vCPU's NOWAIT GUP queues no uffd message: only the async workers (and any
        # synchronous fallback) sleep on the uffd.
        assert result.tracepoints["kvm_async_pf_not_present"] > 0


def test_async_pf_completed_once_when_the_stream_wins_the_race() -> None:
    """Regression of the destination's race: the background stream places the page before
    the async PF worker runs (a long workqueue delay); the worker's GUP then finds it, and
    the APF still completes exactly once (the run's invariants check every transition)."""
    d = postcopy_scenario(link_gbps=100.0)
    d["host"]["worker_start_ns"] = 5_000_000
    scenario = scenario_from_dict(d)
    sim = Simulation(scenario, "x86", seed=3)
    result = sim.run()
    tp = result.tracepoints
    assert tp["kvm_async_pf_not_present"] > 0
    assert tp["kvm_async_pf_completed"] == tp["kvm_async_pf_not_present"]
    pc = result.postcopy
    assert pc is not None
    # Some workers found their page already placed: fewer blocked than APFs.
    assert pc["faults_blocked"] < tp["kvm_async_pf_not_present"]


def test_postcopy_absent_from_results_when_off() -> None:
    d = postcopy_scenario()
    del d["postcopy"]
    d["host"]["memory_limit_mib"] = 56
    result = Simulation(scenario_from_dict(d), "sync", seed=1).run()
    assert result.postcopy is None and "postcopy" not in result.to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host": {"memory_limit_mib": 32}}, "host.memory_limit_mib: postcopy"),
        ({"postcopy": {"enabled": True, "uffds": "per-vcpu"}}, "postcopy.uffds"),
        (
            {"guest": {"vcpus": 2, "memory_mib": 65, "reserved_mib": 0}, "host": {}},
            "postcopy.page_size",
        ),
    ],
)
def test_bad_postcopy_scenarios_name_the_field(change: dict[str, Any], message: str) -> None:
    d = postcopy_scenario(page_size="2m")
    for k, v in change.items():
        d[k] = {**d[k], **v} if k != "postcopy" else {**v, "page_size": "2m"}
    if "memory_mib" in d["guest"] and d["guest"]["memory_mib"] == 65:
        d["host"]["memory_limit_mib"] = 65
    with pytest.raises(ValueError, match=message):
        scenario_from_dict(d)


def test_huge_host_pages_are_mapped_as_stage2_blocks() -> None:
    """hugetlbfs-backed guest memory: ``user_mem_abort`` maps the whole 2 MiB block on the
    first fault, so a sequential writer takes one fault per host page, not per 4 KiB."""
    d = postcopy_scenario(page_size="2m")
    d["tasks"] = [{"kind": "memory_hog", "memory_mib": 32, "passes": 1, "iterations": 1}]
    result = Simulation(scenario_from_dict(d), "sync", seed=1).run()
    f = result.faults
    assert result.postcopy is not None and result.postcopy["host_pages_left"] == 0
    # 16 host pages under the hog (its first gfn may sit mid-block: at most one more).
    assert 16 <= f["minor"] + f["needs_io"] <= 17


def test_receive_window_bounds_the_backlog_when_placement_is_slower_than_the_link() -> None:
    """TCP flow control: at 100 Gb/s the listen thread (about 1.4 us a page) is slower than
    the link, so the stream runs at the placement rate and a requested page waits behind at
    most the send buffer and the receive buffer, not behind everything already sent."""
    p = params(link_bits_per_s=100e9)
    n = 1 << 15  # 128 MiB: about 47 ms to place
    eng, _, dest = destination(n, p)
    eng.run(until=20_000_000)
    woke: list[int] = []
    t0 = eng.now
    dest.wait(n - 3, 0, lambda _: woke.append(eng.now), None)
    eng.run(until=10**10)
    page = TARGET_PAGE + PAGE_HEADER_BYTES
    copy = p.uffdio_copy_ns + p.copy_ns_per_page
    queued = (p.buffer_bytes + p.receive_buffer_bytes) // page + 2 * (p.frame_bytes * 16 // page)
    assert woke[0] - t0 < queued * (copy + p.wake_entry_ns) + 2 * p.one_way_ns + 50_000
    # The whole migration runs at the placement rate, not the link's.
    assert dest.stats.last_placed_ns >= n * copy
