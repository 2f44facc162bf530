"""Partial-order reduction (World.ample, the search's cycle proviso): the same verdicts and
the same shortest counterexamples as the full search, and the ample sets' conditions
checked exhaustively on every state of the 2×2×2 worlds.

The reduced search's own verdict is compared too, before the search without reduction
that rebuilds a violation's shortest trace: that search must not be what finds it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

import pytest

import apfsim.check.search as search
from apfsim.check import CheckResult, WorldConfig, check
from apfsim.check.mutants import MUTANTS
from apfsim.check.world import Action, Violation, World
from apfsim.cli import main
from apfsim.registry import PROTOCOLS


def _worlds() -> list[Any]:
    """Every protocol's 2×2×2 world; every mutant in its own world and with two vCPUs (a
    one-vCPU world has no other vCPU to reduce against), each also with the fix in."""
    # Each protocol's complete 2x2x2 world takes seconds: the full tier. The mutants' worlds
    # are small and stay in the fast one.
    worlds = [
        pytest.param(WorldConfig(protocol=name), id=name, marks=pytest.mark.slow)
        for name in PROTOCOLS
    ]
    for m in MUTANTS.values():
        own = WorldConfig(protocol=m.protocol, **m.world)
        for world, size in ((own, "own"), (replace(own, vcpus=2), "2vcpus")):
            # The widened worlds are the larger ones: the full tier.
            marks = [pytest.mark.slow] if size == "2vcpus" else []
            worlds.append(pytest.param(world, id=f"{m.name}-fixed-{size}", marks=marks))
            worlds.append(
                pytest.param(replace(world, mutant=m.name), id=f"{m.name}-{size}", marks=marks)
            )
    return worlds


def _verdict(result: CheckResult) -> tuple[Any, ...]:
    v = result.violation
    if v is None:
        return (None,)
    return (v.prop, len(v.trace), v.doomed_after, tuple(step.action for step in v.trace))


@pytest.mark.parametrize("config", _worlds())
def test_reduced_search_reaches_the_same_verdict_and_shortest_trace(
    config: WorldConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = check(config, reduce=False)
    assert full.complete
    reduced = check(config, reduce=True)
    assert _verdict(reduced) == _verdict(full)
    # The reduced search alone: a violation exactly when the full search has one, and never
    # more states.
    monkeypatch.setattr(search, "_full_trace", lambda found, *_: found)
    alone = check(config, reduce=True)
    assert alone.complete and alone.states <= full.states
    assert (alone.violation is None) == (full.violation is None)
    if full.violation is not None and full.violation.doomed_after is None:
        assert alone.violation is not None and alone.violation.doomed_after is None
        assert len(alone.violation.trace) >= len(full.violation.trace)


def test_reduction_saves_states_where_a_vcpu_is_left_alone() -> None:
    """x86, three vCPUs and one task: the idle vCPUs' entries need no interleaving with it
    (458 states against 1,008)."""
    world = WorldConfig(protocol="x86", vcpus=3, tasks=1, pages=1)
    assert check(world, reduce=True).states * 2 < check(world, reduce=False).states


def _outcome(world: World, state: tuple[Any, ...], path: list[Action]) -> tuple[Any, ...]:
    """Where ``path`` leads from ``state``: a state, the violation a step raises, or the
    step that is not enabled."""
    world.thaw(state)
    for action in path:
        if action not in world.actions():
            return ("disabled", action)
        try:
            world.step(action)
        except Violation as violation:
            return ("violation", violation.prop)
    return ("state", world.freeze())


def _broken_at(world: World, outcome: tuple[Any, ...]) -> bool:
    if outcome[0] != "state":
        return False
    world.thaw(outcome[1])
    return world.broken() is not None


def _ample_conditions(config: WorldConfig) -> list[str]:
    """Over every reachable state u and vCPU v whose steps A = World.local_steps(v) are a
    candidate ample set, and every enabled step b of another process:

    - closure: after b, A is still v's candidate set (so along any path of other
      processes' steps, v's steps stay enabled and the conditions below keep holding:
      with this, C1 of Clarke/Grumberg/Peled);
    - independence: for each a in A, a then b and b then a reach the same state (or b
      raises the same violation), each staying enabled after the other;
    - no masking: if b raises a violation or reaches a broken state, so does a then b
      (with independence, a violation the full search reaches from u is also reached
      after a: the invariants need no more invisibility than that).

    Broken states are not expanded (the search stops at the first).
    """
    world = World(config)
    root = world.freeze()
    seen = {root}
    queue = deque([root])
    failures: list[str] = []
    while queue:
        state = queue.popleft()
        world.thaw(state)
        actions = world.actions()
        if world.broken() is not None:
            continue
        for v in range(config.vcpus):
            world.thaw(state)
            local = world.local_steps(v, actions)
            if local is None:
                continue
            for b in (b for b in actions if b not in local):
                after_b = _outcome(world, state, [b])
                if after_b[0] == "state":
                    world.thaw(after_b[1])
                    if world.broken() is None and world.local_steps(v, world.actions()) != local:
                        failures.append(f"closure: vCPU{v} {local} after {b}")
                for a in local:
                    ab = _outcome(world, state, [a, b])
                    if after_b[0] == "state" and not _broken_at(world, after_b):
                        if ab != _outcome(world, state, [b, a]):
                            failures.append(f"independence: {a} and {b}")
                    elif not (ab[0] == "violation" or _broken_at(world, ab)):
                        failures.append(f"masking: {a} before {b} hides its violation")
        for action in actions:
            after = _outcome(world, state, [action])
            if after[0] == "state" and after[1] not in seen:
                seen.add(after[1])
                queue.append(after[1])
    return failures


@pytest.mark.slow
@pytest.mark.parametrize("config", [w for w in _worlds() if w.values[0].vcpus == 2])
def test_ample_sets_are_independent_closed_and_invisible(config: WorldConfig) -> None:
    assert _ample_conditions(config) == []


def test_cli_no_reduce(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["check", "x86", "--vcpus", "3", "--tasks", "1", "--pages", "1", "--quiet"]
    assert main(args) == 0
    reduced = capsys.readouterr().out
    assert main([*args, "--no-reduce"]) == 0
    full = capsys.readouterr().out
    assert "no violation" in reduced and "no violation" in full
    assert reduced != full  # fewer states
