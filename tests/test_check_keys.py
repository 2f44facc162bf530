"""The checker's flat state keys (World.freeze / World.thaw) against the full pickle.

The search identifies states by :meth:`World.freeze` and restores one scratch world with
:meth:`World.thaw` before each step. A field that either leaves out would merge states
that differ, or carry a value from one branch into another. Here every transition of a
world is keyed both ways (``World.key`` pickles the whole object graph, counters and
history stripped) and the two partitions must be the same; the thawed world must pickle
exactly as the state it was thawed from did when it was reached.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from apfsim.check import WorldConfig, check
from apfsim.check.mutants import MUTANTS
from apfsim.check.world import Violation, World
from apfsim.protocols.common import GuestBase
from apfsim.registry import PROTOCOLS


def crosscheck(config: WorldConfig, limit: int | None = None) -> int:
    """Breadth first with both keys; returns the number of states reached."""
    world = World(config)
    root = world.freeze()
    pickled: dict[tuple[Any, ...], bytes] = {root: world.key()}
    flat_of: dict[bytes, tuple[Any, ...]] = {pickled[root]: root}
    queue = deque([root])
    while queue and (limit is None or len(pickled) < limit):
        state = queue.popleft()
        world.thaw(state)
        assert world.key() == pickled[state], "thaw did not restore the pickled state"
        for action in world.actions():
            world.thaw(state)
            try:
                world.step(action)
            except Violation:
                continue
            flat, full = world.freeze(), world.key()
            hash(flat)
            known = pickled.get(flat)
            if known is None:
                assert full not in flat_of, (
                    f"{action}: one state has two flat keys (a field frozen that is not state)"
                )
                pickled[flat] = full
                flat_of[full] = flat
                queue.append(flat)
            else:
                assert known == full, (
                    f"{action}: two states share a flat key (a field freeze leaves out)"
                )
    return len(pickled)


def test_thaw_is_freeze_inverse_at_the_root() -> None:
    for name in PROTOCOLS:
        world = World(WorldConfig(protocol=name))
        state = world.freeze()
        other = World(WorldConfig(protocol=name))
        other.thaw(state)
        assert other.freeze() == state
        assert other.key() == world.key()


@pytest.mark.slow
def test_keys_agree_on_a_bounded_prefix_of_every_world() -> None:
    for name in PROTOCOLS:
        crosscheck(WorldConfig(protocol=name), limit=1500)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_keys_agree_on_every_state_of_the_2x2x2_world(name: str) -> None:
    config = WorldConfig(protocol=name)
    states = crosscheck(config)
    assert states == check(config, reduce=False).states


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_keys_agree_in_every_mutant_world(name: str) -> None:
    mutant = MUTANTS[name]
    crosscheck(WorldConfig(protocol=mutant.protocol, **mutant.world), limit=20_000)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        WorldConfig("x86", hotplug=1, lapic=True, tasks=1),
        WorldConfig("x86-legacy", event_pending=True, reboot=True, tasks=1),
        WorldConfig("arm64-rfcv2", hotplug=1, reboot=True, tasks=1),
        WorldConfig("s390-pfault", hotplug=1, reboot=True, tasks=1),
        WorldConfig("guest-initiated", hotplug=1, reboot=True, tasks=1),
    ],
    ids=lambda c: c.protocol,
)
def test_keys_agree_with_lifecycle_steps(config: WorldConfig) -> None:
    crosscheck(config, limit=20_000)


# What each state class holds besides the scalar fields its Fields list freezes: the
# parts its freeze handles by hand, and what is not state (ports, counters, configuration
# fixed at creation). A new attribute must be added to freeze/thaw or named here.
_WORLD_OTHER = {
    "config",
    "variant",
    "rules",
    "log",
    "driver",
    "host",
    "guest",
    "vcpus",
    "_floating",
}
_WORLD_OTHER |= {"pages", "io", "tasks", "scripts", "reboot_left", "rebooted", "running_cpu"}
_VCPU_OTHER = {"cpu", "world", "rq", "current", "frames", "pending_irqs"}
_HOST_KNOWN = {
    *("prefault", "gup_nowait", "kick", "start_worker", "now", "userfault"),  # ports
    *("stats", "declined", "populates", "mutant", "token_id_mask", "user_exits"),  # counters
    *("apf", "arch"),  # HostBase.freeze
    *("told", "pfault_enabled", "float_pfault", "lost_done", "flushing"),  # freeze_own
}


def test_every_attribute_is_frozen_or_named_as_not_state() -> None:
    from apfsim.check.world import _VCPU

    for name in PROTOCOLS:
        world = World(WorldConfig(protocol=name))
        assert set(vars(world)) == _WORLD_OTHER, name
        for vc in world.vcpus:
            assert set(vars(vc)) == set(_VCPU.names) | _VCPU_OTHER, name
        extra = set(vars(world.host)) - _HOST_KNOWN
        assert not extra, f"{name} host: {sorted(extra)} neither frozen nor named here"
        guest = world.guest
        if hasattr(guest, "__dataclass_fields__"):
            assert isinstance(guest, GuestBase), name  # scalar_fields is GuestBase's
            frozen = set(guest.scalar_fields().names) | set(type(guest).not_state())
            unnamed = set(vars(guest)) - frozen - {"mutant"}
            assert not unnamed, f"{name} guest: {sorted(unnamed)}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        WorldConfig("x86"),
        WorldConfig("arm64-rfcv2"),  # a liveness counterexample (F4)
        WorldConfig(MUTANTS["B9"].protocol, mutant="B9", **MUTANTS["B9"].world),  # safety
    ],
    ids=["x86", "arm64-rfcv2", "B9"],
)
def test_hash_compaction_finds_what_the_full_keys_find(config: WorldConfig) -> None:
    full = check(config)
    compact = check(config, compact_after=10)
    assert (compact.states, compact.transitions, compact.depth) == (
        full.states,
        full.transitions,
        full.depth,
    )
    if full.violation is None:
        assert compact.violation is None
    else:
        assert compact.violation is not None
        assert compact.violation.prop == full.violation.prop
        assert compact.violation.trace == full.violation.trace


def test_hash_consing_keeps_every_field_of_its_own_type() -> None:
    """False == 0: one table for all parts gave ``rebooted`` (False) the int 0 stored for
    ``reboot_left`` just before it, which the compiled build rejects as a bool field."""
    from apfsim.check.search import _shared

    world = World(WorldConfig(protocol="x86"))
    key = world.freeze()
    assert world.reboot_left == 0 and world.rebooted is False
    tables: list[dict[Any, Any]] = [{} for _ in key]
    world.thaw(_shared(key, [table.setdefault for table in tables]))
    assert type(world.rebooted) is bool
    assert type(world.reboot_left) is int
    assert all(type(page) is bool for page in world.pages)
