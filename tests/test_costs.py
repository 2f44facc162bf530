"""The named per-operation host costs (``[host.costs]``): each is charged where its kernel
operation happens, and only there."""

from __future__ import annotations

import pytest

import apfsim
from apfsim.api import run_protocol
from test_more_variants import small_scenario

BIG_NS = 1_000_000  # 1 ms: dwarfs every other host cost in these runs


def with_host_cost(field: str, value: int) -> apfsim.Scenario:
    base = small_scenario().model_dump()
    base["host"]["costs"] = {field: value}
    return apfsim.Scenario.model_validate(base)


# (protocol, cost, the counters whose sum is how many times the cost is paid at least)
CASES = [
    ("arm64-rfcv2", "exception_inject_ns", ("not_present_injected", "page_ready_injected")),
    ("x86", "exception_inject_ns", ("not_present_injected",)),
    ("x86", "interrupt_inject_ns", ("page_ready_injected",)),
    ("x86", "ack_exit_ns", ("acks",)),
    ("arm64-sdei-ppi", "sdei_deliver_ns", ("not_present_injected",)),
    ("arm64-sdei-ppi", "sdei_complete_ns", ("sdei_completions",)),
    ("arm64-sdei-ppi", "ipi_send_ns", ("sdei_events",)),  # the handler's self-IPI
    ("arm64-sdei-ppi", "interrupt_inject_ns", ("page_ready_injected",)),
    ("arm64-sdei-ppi", "ack_exit_ns", ("acks",)),
    ("guest-initiated", "hypercall_ns", ("populate_hypercalls",)),
]


@pytest.mark.parametrize(("protocol", "cost", "counters"), CASES)
def test_named_cost_is_paid_once_per_operation(
    protocol: str, cost: str, counters: tuple[str, ...]
) -> None:
    r = run_protocol(with_host_cost(cost, BIG_NS), protocol, seed=2)
    times = sum(r.apf[c] for c in counters)
    assert times > 50
    host_s = r.vcpus[0].time_s["host"]
    assert host_s >= times * BIG_NS / 1e9
    # Paid once, not several times over: everything else in host time is far smaller.
    assert host_s < (times + 1) * BIG_NS / 1e9 + 0.2


@pytest.mark.parametrize(
    ("protocol", "cost"),
    [
        ("x86", "sdei_deliver_ns"),
        ("x86", "sdei_complete_ns"),
        ("arm64-rfcv2", "interrupt_inject_ns"),
        ("arm64-rfcv2", "ack_exit_ns"),
        ("sync", "exception_inject_ns"),
    ],
)
def test_a_cost_the_protocol_never_pays_changes_nothing(protocol: str, cost: str) -> None:
    base = run_protocol(small_scenario(), protocol, seed=2).to_dict()
    changed = run_protocol(with_host_cost(cost, BIG_NS), protocol, seed=2).to_dict()
    # The results record the cost as configured (host_costs); nothing it measures moves.
    assert changed.pop("host_costs")[cost] == BIG_NS
    assert base.pop("host_costs")[cost] != BIG_NS
    assert base == changed


def test_two_traps_in_one_handler_are_two_round_trips() -> None:
    """SDEI: the self-IPI write and SDEI_EVENT_COMPLETE each exit: exit+entry twice."""
    round_trip = {"exit_ns": 100_000, "entry_ns": 100_000}
    base = small_scenario().model_dump()
    base["host"].update(round_trip)
    r = run_protocol(apfsim.Scenario.model_validate(base), "arm64-sdei-ppi", seed=2)
    # Per not-present: the stage-2 exit and entry, then two trapping instructions.
    events = r.apf["sdei_events"]
    assert r.vcpus[0].time_s["host"] >= events * 3 * 200_000 / 1e9
