"""Second line of defence: hypothesis drives random interleavings through the checker's own
steps (the simulator's protocol code) and shrinks any failure to a short one."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from apfsim.check.mutants import MUTANTS
from apfsim.check.world import Violation, World, WorldConfig, has_lifecycle
from apfsim.registry import PROTOCOLS

# A design whose reboot is a finding of its own: s390's cancel leaves queued completions to
# be delivered into the next kernel (docs/findings.md F5, tests/test_s390_pfault.py).
REBOOT_FINDINGS = {"s390-pfault"}
# The seed's no-inject window ends at kernel_entry, so a page-ready abort can land in
# entry-common before a system call's ESR/FAR are read (docs/findings.md, the seed's window;
# test_the_seeds_window_lets_an_abort_clobber_an_unread_syndrome). A random walk finds it
# now and then; here that design's tasks make no system calls.
SYSCALL_FINDINGS = {"arm64-rfcv2"}

WORLDS = [
    WorldConfig(
        protocol=name,
        vcpus=2,
        tasks=3,
        pages=2,
        hotplug=int(has_lifecycle(name)),
        reboot=has_lifecycle(name) and name not in REBOOT_FINDINGS,
        syscalls=False if name in SYSCALL_FINDINGS else None,
    )
    for name in PROTOCOLS
]


class Interleavings(RuleBasedStateMachine):
    """Any enabled step, in any order; every state must satisfy the invariants."""

    config: WorldConfig = WORLDS[0]

    @initialize(config=st.sampled_from(WORLDS))
    def boot(self, config: WorldConfig) -> None:
        self.world = World(config)
        self.steps: list[str] = []

    @rule(choice=st.integers(min_value=0, max_value=1_000))
    def step(self, choice: int) -> None:
        actions = self.world.actions()
        if not actions:
            return
        action = actions[choice % len(actions)]
        self.steps.append(self.world.describe(action))
        self.world.step(action)  # a Violation fails the test with the steps so far

    @invariant()
    def invariants_hold(self) -> None:
        if hasattr(self, "world"):
            assert self.world.broken() is None, self.steps


TestInterleavings = pytest.mark.slow(Interleavings.TestCase)  # 60 walks of 60 steps: full tier
TestInterleavings.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,  # the same walks on every run: CI must not depend on luck
    suppress_health_check=[HealthCheck.too_slow],
)


# B14 needs 2000 random walks (17 s): the full tier.
@pytest.mark.parametrize("name", ["B1", "B4", "B9", pytest.param("B14", marks=pytest.mark.slow)])
def test_random_interleavings_also_find_safety_mutants(name: str) -> None:
    """Hypothesis alone finds the mutants a single step exposes."""
    m = MUTANTS[name]
    config = replace(WorldConfig(protocol=m.protocol, **m.world), mutant=name)

    class Mutated(Interleavings):
        @initialize()
        def boot_mutant(self) -> None:
            self.world = World(config)
            self.steps = []

    Mutated.boot = None  # type: ignore[assignment]  # only the mutant's world
    Mutated.TestCase.settings = settings(
        max_examples=2000, stateful_step_count=60, deadline=None, database=None, derandomize=True
    )
    with pytest.raises((AssertionError, Violation)):
        Mutated.TestCase().runTest()
