"""What ``apfsim check`` prints and writes: the search's size and speed, then either "no
violation" or the broken property with its shortest trace, step by step."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from apfsim.check.mutants import MUTANTS
from apfsim.check.search import CheckResult

__all__ = ["mutants_text", "result_dict", "result_text"]

SCHEMA_VERSION = 1


def world_line(result: CheckResult) -> str:
    c = result.config
    extras = []
    if c.hotplug:
        back = ", never back online" if c.stay_offline else ""
        extras.append(f"{c.hotplug} hotplug cycle(s){back}")
    if c.reboot:
        extras.append("reboot")
    if c.lapic:
        extras.append("LAPIC toggle")
    if c.event_pending:
        extras.append("faults with a pending event")
    if c.send_always:
        extras.append("SEND_ALWAYS")
    if c.stream:
        extras.append("postcopy stream")
    if c.mutant:
        extras.append(f"mutant {c.mutant}")
    more = f"; {', '.join(extras)}" if extras else ""
    return (
        f"{c.protocol}: {c.vcpus} vCPU(s), {c.tasks} task(s), {c.pages} page(s), "
        f"accesses in {'/'.join(c.modes)} mode{more}"
    )


def result_text(result: CheckResult) -> str:
    lines = [world_line(result)]
    scope = "complete" if result.complete else "cut short (depth or state limit)"
    lines.append(
        f"explored {result.states} states, {result.transitions} transitions, depth "
        f"{result.depth}, {scope}, in {result.seconds:.1f} s "
        f"({result.states_per_second:,.0f} states/s)"
    )
    violation = result.violation
    if violation is None:
        lines.append("no violation")
        return "\n".join(lines)
    lines.append(f"VIOLATION {violation.prop}")
    lines.append(f"  {violation.detail}")
    lines.append(f"shortest trace ({len(violation.trace)} steps):")
    for n, step in enumerate(violation.trace, 1):
        if violation.doomed_after is not None and n == violation.doomed_after + 1:
            lines.append("  --- from here no interleaving lets every task finish; it goes on: ---")
        lines.append(f"  {n:3d}. {step.action}")
        for effect in step.effects:
            lines.append(f"         {effect}")
    return "\n".join(lines)


def result_dict(result: CheckResult) -> dict[str, Any]:
    violation = result.violation
    return {
        "schema_version": SCHEMA_VERSION,
        "world": asdict(result.config),
        "states": result.states,
        "transitions": result.transitions,
        "depth": result.depth,
        "complete": result.complete,
        "goal_states": result.goal_states,
        "violation": None
        if violation is None
        else {
            "property": violation.prop,
            "doomed_after": violation.doomed_after,
            "detail": violation.detail,
            "trace": [{"action": s.action, "effects": list(s.effects)} for s in violation.trace],
        },
    }


def mutants_text() -> str:
    lines = []
    for m in MUTANTS.values():
        lines.append(f"{m.name} ({', '.join((m.protocol, *m.also))})")
        lines.append(f"  fix:      {m.fix}")
        lines.append(f"  reverted: {m.reverted}")
    return "\n".join(lines)
