"""Per-arch exit-cost presets (``host.costs.preset``): the figures, where a run takes them
from, how explicit keys override them, and the error for a bad name."""

from __future__ import annotations

import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, get_args

import pytest

import apfsim
from apfsim.api import run_protocol
from apfsim.host.costs import (
    AUTO_PRESET,
    PRESET_NAMES,
    PRESETS,
    PresetName,
    ResolvedCosts,
    resolve_costs,
)
from apfsim.metrics.results import ProtocolResult
from apfsim.registry import PROTOCOLS
from apfsim.scenario import (
    ScenarioError,
    load_scenario,
    parse_toml,
    scenario_from_dict,
    scenario_to_toml,
    with_overrides,
)
from apfsim.simulation import Simulation
from apfsim.sweep import parse_sweep
from cli_helpers import assert_one_line_error, cli
from test_bad_input import BASE, scenario_file
from test_more_variants import small_scenario

MODEL_MD = Path(__file__).resolve().parent.parent / "docs" / "model.md"

# The published round trips each preset is built from, in ns (docs/model.md "Per-arch cost
# presets"): SplitX's 2,000-cycle direct exit cost at 2.93 GHz; micro-bench "hvc" on Ampere
# Altra (VHE) and on Juno r2's Cortex-A53 (nVHE).
PUBLISHED_ROUND_TRIP_NS = {
    "x86-vmx": round(2_000 / 2.93),
    "arm64-vhe": 306,
    "arm64-nvhe": 4_530,
}


def with_host(base: apfsim.Scenario, **host: Any) -> apfsim.Scenario:
    """``base`` with ``[host]`` keys set; ``costs`` merges into ``[host.costs]``."""
    data = base.model_dump()
    costs = host.pop("costs", {})
    data["host"].update(host)
    data["host"]["costs"].update(costs)
    return apfsim.Scenario.model_validate(data)


def test_the_preset_names_are_the_scenario_choices() -> None:
    assert tuple(get_args(PresetName)) == PRESET_NAMES
    assert set(PRESETS) | {"auto"} == set(PRESET_NAMES)
    assert set(AUTO_PRESET.values()) <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_ROUND_TRIP_NS))
def test_each_preset_is_its_published_round_trip(name: str) -> None:
    """A null hypercall costs exit + dispatch + entry: the measured round trip."""
    p = PRESETS[name]
    assert p.exit_ns + p.entry_ns + p.hypercall_ns == PUBLISHED_ROUND_TRIP_NS[name]
    assert abs(p.exit_ns - p.entry_ns) <= 1  # the even split (an assumption)
    # The costs no published figure covers keep the generic assumption.
    generic = PRESETS["generic"]
    for field in ("ack_exit_ns", "ipi_send_ns", "interrupt_inject_ns", "exception_inject_ns"):
        assert getattr(p, field) == getattr(generic, field), field


def test_vhe_is_cheaper_than_nvhe_and_x86_in_between() -> None:
    """The published ordering: VHE runs the host at EL2, nVHE bounces through it."""
    trip = {n: PRESETS[n].exit_ns + PRESETS[n].entry_ns for n in PUBLISHED_ROUND_TRIP_NS}
    assert trip["arm64-vhe"] < trip["x86-vmx"] < trip["arm64-nvhe"]


def test_the_generic_preset_is_the_old_fixed_costs() -> None:
    """``generic`` reproduces a run from before presets: 1 µs each way, 500 ns dispatch."""
    g = PRESETS["generic"]
    assert (g.exit_ns, g.entry_ns, g.hypercall_ns, g.ack_exit_ns) == (1_000, 1_000, 500, 300)
    assert (g.ipi_send_ns, g.interrupt_inject_ns, g.exception_inject_ns) == (1_000, 300, 500)
    assert (g.sdei_deliver_ns, g.sdei_complete_ns) == (1_500, 1_000)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_docs_list_every_preset_figure(name: str) -> None:
    """docs/model.md's preset table has each preset's row as the code has it."""
    p = PRESETS[name]
    row = f"| `{name}` | " + " | ".join(str(v) for v in asdict(p).values()) + " |"
    assert row in MODEL_MD.read_text(), row


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_run_resolves_the_preset_it_names(name: str) -> None:
    scenario = with_host(small_scenario(), costs={"preset": name})
    sim = Simulation(scenario, "x86", seed=0)
    assert sim.costs.preset == name
    assert sim.costs == ResolvedCosts(preset=name, **asdict(PRESETS[name]))


def test_the_results_record_the_costs_the_run_charged() -> None:
    """A scenario leaves the costs unset; the results say what they resolved to."""
    scenario = with_host(small_scenario(), exit_ns=999, costs={"preset": "arm64-nvhe"})
    result = run_protocol(scenario, "arm64-rfcv2", seed=1, duration_s=0.2)
    expected = {**asdict(PRESETS["arm64-nvhe"]), "exit_ns": 999, "preset": "arm64-nvhe"}
    assert result.host_costs == expected
    data = result.to_dict()
    assert data["host_costs"] == expected
    assert ProtocolResult.from_dict(data).to_dict() == data


@pytest.mark.slow  # two 2 s runs each
@pytest.mark.parametrize("name", ["x86-vmx", "arm64-nvhe"])
def test_a_run_under_a_preset_is_the_run_with_its_figures_written_out(name: str) -> None:
    """The preset's figures are what the run charges: spelling them out changes nothing,
    and a different preset changes the run."""
    p = PRESETS[name]
    explicit = with_host(
        small_scenario(),
        exit_ns=p.exit_ns,
        entry_ns=p.entry_ns,
        costs={k: v for k, v in asdict(p).items() if k not in ("exit_ns", "entry_ns")},
    )
    by_preset = with_host(small_scenario(), costs={"preset": name})
    other = with_host(small_scenario(), costs={"preset": "generic"})
    runs = [run_protocol(s, "guest-initiated", seed=3).to_dict() for s in (by_preset, explicit)]
    # Only the recorded preset name differs: every figure was given explicitly.
    assert runs[0]["host_costs"].pop("preset") == name
    assert runs[1]["host_costs"].pop("preset") == "x86-vmx"  # auto, but nothing taken from it
    assert runs[0] == runs[1]
    assert run_protocol(other, "guest-initiated", seed=3).to_dict() != runs[0]


def test_a_hypercall_round_trip_costs_what_the_preset_says() -> None:
    """guest-initiated asks for every page by hypercall: with only the hypercall dispatch
    made huge, host time grows by that dispatch per hypercall, on top of the preset's own
    exit + entry per hypercall."""
    big = 1_000_000
    p = PRESETS["arm64-nvhe"]
    base = with_host(small_scenario(), costs={"preset": "arm64-nvhe", "hypercall_ns": big})
    r = run_protocol(base, "guest-initiated", seed=2)
    calls = r.apf["populate_hypercalls"]
    assert calls > 50
    host_s = r.vcpus[0].time_s["host"]
    assert host_s >= calls * (big + p.exit_ns + p.entry_ns) / 1e9
    assert host_s < (calls + 1) * big / 1e9 + 0.2


def test_explicit_keys_override_the_preset() -> None:
    scenario = with_host(
        small_scenario(), exit_ns=777, costs={"preset": "arm64-nvhe", "hypercall_ns": 5}
    )
    costs = resolve_costs(scenario.host, "arm64")
    nvhe = PRESETS["arm64-nvhe"]
    assert costs == replace(
        resolve_costs(with_host(small_scenario(), costs={"preset": "arm64-nvhe"}).host, "x86"),
        exit_ns=777,
        hypercall_ns=5,
    )
    assert (costs.entry_ns, costs.ack_exit_ns) == (nvhe.entry_ns, nvhe.ack_exit_ns)
    # A zero is a value, not "unset".
    zero = with_host(small_scenario(), entry_ns=0)
    assert resolve_costs(zero.host, "x86").entry_ns == 0


def test_overrides_and_toml_round_trip_keep_unset_keys_unset() -> None:
    scenario = with_overrides(small_scenario(), {"host.costs.preset": "arm64-vhe"})
    text = scenario_to_toml(scenario)
    assert "# exit_ns = (unset)" in text and 'preset = "arm64-vhe"' in text
    again = scenario_from_dict(parse_toml(text))
    assert again == scenario and again.host.exit_ns is None
    set_one = with_overrides(scenario, {"host.exit_ns": 1234})
    assert resolve_costs(set_one.host, "arm64").exit_ns == 1234
    assert scenario_from_dict(parse_toml(scenario_to_toml(set_one))) == set_one


def expected_auto(protocol: str, guest_arch: str) -> str:
    arch = PROTOCOLS[protocol].arch
    return {"x86": "x86-vmx", "arm64": "arm64-vhe", "s390": "generic"}[
        guest_arch if arch == "any" else arch
    ]


@pytest.mark.parametrize("guest_arch", ["arm64", "x86"])
@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_auto_is_the_preset_of_the_protocols_arch(protocol: str, guest_arch: str) -> None:
    data = small_scenario().model_dump()
    data["guest"]["arch"] = guest_arch
    sim = Simulation(apfsim.Scenario.model_validate(data), protocol, seed=0)
    assert sim.costs.preset == expected_auto(protocol, guest_arch)


def test_auto_by_name() -> None:
    assert expected_auto("arm64-rfcv2", "x86") == "arm64-vhe"
    assert expected_auto("sync", "x86") == "x86-vmx"
    assert expected_auto("s390-pfault", "arm64") == "generic"


def test_a_bad_preset_name_says_which_one_was_meant(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, BASE + '\n[host.costs]\npreset = "arm64-vhee"\n')
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    message = str(err.value)
    assert "\n" not in message
    assert "host.costs.preset" in message and "did you mean 'arm64-vhe'?" in message


def test_a_bad_preset_name_exits_2_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = scenario_file(tmp_path, BASE + '\n[host.costs]\npreset = "x86_vmx"\n')
    code, _, err = cli(["run", str(path), "-q", "-p", "sync"], capsys)
    assert_one_line_error(code, err, "host.costs.preset", "did you mean 'x86-vmx'?")
    assert re.search(r"got 'x86_vmx'", err), err


def test_a_sweep_can_cross_presets_with_an_explicit_key() -> None:
    """The preset is a scenario key like any other: a grid over it (and over an override)
    gives one run per combination, each resolving as a single scenario would."""
    data = {
        "name": "presets",
        "scenario": "rfcv2-2020",
        "duration_s": 0.05,
        "protocols": ["arm64-rfcv2"],
        "seeds": 1,
        "grid": {"host.costs.preset": ["arm64-vhe", "arm64-nvhe"], "host.exit_ns": [None, 9]},
    }
    spec = parse_sweep(data, "presets")
    resolved = [resolve_costs(scenario_from_dict(r.scenario).host, "arm64") for r in spec.runs]
    assert [(c.preset, c.exit_ns) for c in resolved] == [
        ("arm64-vhe", PRESETS["arm64-vhe"].exit_ns),
        ("arm64-vhe", 9),
        ("arm64-nvhe", PRESETS["arm64-nvhe"].exit_ns),
        ("arm64-nvhe", 9),
    ]


def test_cost_keys_set_every_figure_whatever_the_preset() -> None:
    from apfsim.host.costs import cost_keys

    nvhe = PRESETS["arm64-nvhe"]
    scenario = with_overrides(
        with_host(small_scenario(), costs={"preset": "generic"}), cost_keys(nvhe)
    )
    assert asdict(resolve_costs(scenario.host, "x86")) == {**asdict(nvhe), "preset": "generic"}
