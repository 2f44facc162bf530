"""The ``memory-fault-exit`` variant: a postcopy page still on the source is fetched by the
faulting vCPU's own thread after a KVM_EXIT_MEMORY_FAULT, not by QEMU's uffd fault thread.

Every figure below is computed from the scenario's ``[postcopy]`` parameters
(apfsim.host.postcopy.PostcopyParams), not copied from a run.
"""

from __future__ import annotations

from typing import Any

from apfsim.check.search import check
from apfsim.check.world import World, WorldConfig
from apfsim.host.postcopy import PAGE_HEADER_BYTES, TARGET_PAGE, PostcopyParams
from apfsim.ports import FaultDecision
from apfsim.scenario import Scenario, scenario_from_dict
from apfsim.simulation import Simulation

MFE = "memory-fault-exit"


def _scenario(vcpus: int = 1, postcopy: dict[str, Any] | None = None) -> Scenario:
    """A writer over 4 MiB of a 16 MiB guest, every page resident on the source (so none is
    a zero page on the wire); with ``postcopy``, the run starts at the switch-over."""
    data: dict[str, Any] = {
        "name": "mfe",
        "duration_s": 0.2,
        "guest": {"vcpus": vcpus, "memory_mib": 16, "reserved_mib": 4},
        "host": {"memory_limit_mib": 16},
        "initial_memory": {"resident_fraction": 1.0, "swapped_fraction": 0.0},
        "tasks": [
            {"kind": "random_writer", "name": f"w{i}", "buffer_mib": 4} for i in range(vcpus)
        ],
    }
    if postcopy is not None:
        data["postcopy"] = {"enabled": True, **postcopy}
    return scenario_from_dict(data)


def _run(scenario: Scenario, protocol: str, seed: int = 1) -> dict[str, Any]:
    return Simulation(scenario, protocol, seed).run().to_dict()


def test_no_uffd_wait_each_remote_fault_is_one_user_fetch() -> None:
    sc = _scenario(vcpus=2, postcopy={})
    mfe, sync = _run(sc, MFE), _run(sc, "sync")
    pc = mfe["postcopy"]
    assert pc["faults_blocked"] == 0 and pc["messages_read"] == 0 and pc["wake_walks"] == 0
    exits = mfe["apf"]["user_exits"]
    assert exits > 0
    # Without swap every fault that needs I/O is on a page still remote: each is one exit,
    # one fetch, one fault-in latency, and none is a sync fallback.
    assert exits == pc["user_fetches"] == mfe["faults"]["needs_io"]
    assert mfe["faults"]["fault_in_latency_us"]["count"] == exits
    assert mfe["faults"]["sync"] == 0 and mfe["apf"]["sync_fallbacks"] == 0
    assert pc["requests_sent"] <= exits
    # The same destination under sync sleeps in handle_userfault instead.
    assert sync["postcopy"]["faults_blocked"] > 0 and sync["postcopy"]["user_fetches"] == 0
    assert "user_exits" not in sync["apf"]


def test_idle_link_latency_is_exit_request_rtt_transfer_copy() -> None:
    cfg = {
        "background": False,  # nothing else on the link: each fetch finds it idle
        "link_gbps": 25.0,
        "rtt_us": 40.0,
        "exit_to_user_ns": 4_000,
        "request_send_ns": 1_500,
        "source_request_ns": 3_000,
        "uffdio_copy_ns": 700,
        "copy_gbytes_per_s": 8.0,
        "wakeup_ns": 2_500,
    }
    sc = _scenario(postcopy=cfg)
    p = PostcopyParams.of(sc.postcopy, 1)
    assert p.one_way_ns == 20_000 and p.host_page_pages == 1
    transfer = round((TARGET_PAGE + PAGE_HEADER_BYTES) * 8e9 / (25.0 * 1e9))  # one 4 KiB page
    copy = 700 + round(TARGET_PAGE / 8.0)  # UFFDIO_COPY + memcpy; no uffd waiter to walk
    expected = (
        4_000  # KVM_RUN -EFAULT to the VMM and back (exit_to_user_ns)
        + 1_500  # the vCPU thread's REQ_PAGES write
        + 2 * 20_000  # the request out, the page back
        + 3_000  # the source's return-path thread
        + transfer
        + copy
        + 2_500  # the vCPU thread woken by the placement
    )
    result = _run(sc, MFE)
    lat = result["faults"]["fault_in_latency_us"]
    assert lat["count"] == result["apf"]["user_exits"] > 100
    assert lat["cdf_us"][0] == lat["cdf_us"][-1] == round(expected / 1000, 3)
    # The destination's own figure ends at the placement, before the wake-up.
    req = result["postcopy"]["request_latency_us"]
    assert req["cdf_us"][0] == req["cdf_us"][-1] == round((expected - 2_500) / 1000, 3)


def test_without_postcopy_it_is_sync() -> None:
    sc = Scenario.model_validate(
        {
            **_scenario().model_dump(mode="json"),
            "host": {"memory_limit_mib": 8},
            "initial_memory": {"resident_fraction": 0.3, "swapped_fraction": 0.7},
        }
    )
    mfe, sync = _run(sc, MFE, seed=4), _run(sc, "sync", seed=4)
    assert mfe.pop("protocol") == MFE and sync.pop("protocol") == "sync"
    assert mfe["faults"]["sync"] > 0  # swap-ins: ordinary blocking GUP
    assert mfe == sync


def test_the_checker_runs_it_as_a_blocking_fault_in() -> None:
    """The checker's world stands for a postcopy destination: every page not yet present is
    marked, so each fault exits to user space; the guest sees what a sync fault-in shows it."""
    world = World(WorldConfig(MFE))
    assert world.host.try_async_pf(0, 0, world._view(0), 0).decision is FaultDecision.USER_EXIT
    mfe, sync = check(WorldConfig(MFE)), check(WorldConfig("sync"))
    assert mfe.violation is None and mfe.complete
    assert (mfe.states, mfe.transitions, mfe.depth) == (sync.states, sync.transitions, sync.depth)
