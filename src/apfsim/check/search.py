"""Breadth-first search over every interleaving of a small world.

States are identified by flat tuples of plain values (:meth:`World.freeze`), so each is
expanded once and the first violation found lies at the smallest depth: its trace is a
shortest one. Safety
properties are checked on every step and every state; liveness ("every task can still
finish") is checked once the search is over, by walking back from the states where every
task is done: a state that cannot reach one is a task asleep forever or a lost page-ready.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from apfsim.check.world import Action, Step, TaskState, Violation, World, WorldConfig

__all__ = ["CheckResult", "Counterexample", "TraceStep", "check"]

ProgressFn = Callable[[int, int], None]  # (states, depth)


@dataclass(frozen=True, slots=True)
class TraceStep:
    action: str
    effects: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Counterexample:
    prop: str
    detail: str
    trace: tuple[TraceStep, ...]
    doomed_after: int | None = None  # liveness: steps after this one only go round in circles


@dataclass(slots=True)
class CheckResult:
    config: WorldConfig
    states: int = 0
    transitions: int = 0
    depth: int = 0
    complete: bool = True  # False: --depth or --max-states cut the search short
    seconds: float = 0.0
    violation: Counterexample | None = None
    goal_states: int = 0
    notes: list[str] = field(default_factory=list)
    ample_states: int = 0  # states where the search tried an ample set (0: it was the full one)

    @property
    def states_per_second(self) -> float:
        return self.states / self.seconds if self.seconds > 0 else 0.0


COMPACT_AFTER = 500_000
"""States kept as full keys; past this many, visited states are kept as 64-bit hashes."""


def check(
    config: WorldConfig,
    max_depth: int | None = None,
    max_states: int = 5_000_000,
    progress: ProgressFn | None = None,
    compact_after: int = COMPACT_AFTER,
    reduce: bool = True,
) -> CheckResult:
    """Explore ``config``'s world; the result holds the first (shortest) violation, if any.

    ``reduce``: partial-order reduction (:meth:`World.ample`, with the cycle proviso of a
    breadth-first search): the same verdict from fewer states. A violation it finds is
    searched for again without reduction (bounded by the depth found, for a safety
    violation), so the trace is the same shortest one the full search reports; unless no
    state had an ample set, and the search was the full one. With ``max_depth`` the search
    is not reduced: a reduced graph may reach a violation only deeper than the full one.

    Once ``compact_after`` states are known, visited states are remembered by the 64-bit
    ``hash`` of their key and only unexpanded states keep their key (hash compaction).
    Two distinct states then merge only if their hashes collide: with n states, with
    probability about n^2 / 2^65 (3e-8 at a million states, 7e-7 at five million).
    """
    t0 = time.perf_counter()
    reduce = reduce and max_depth is None
    # The search makes millions of tuples and no reference cycles: the cyclic collector
    # would only walk them again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:
        result = _search(config, max_depth, max_states, progress, t0, compact_after, reduce)
        if result.ample_states and result.violation is not None:
            result = _full_trace(result, config, max_states, progress, compact_after)
        return result
    finally:
        if collecting:
            gc.enable()


def _full_trace(
    reduced: CheckResult,
    config: WorldConfig,
    max_states: int,
    progress: ProgressFn | None,
    compact_after: int,
) -> CheckResult:
    """The reduced search found a violation, maybe by a longer path than the shortest: the
    search without reduction finds the shortest one. For a safety violation it need not go
    deeper than the path found (one exists at that depth); a liveness one needs the whole
    graph. If that search is cut short before it finds one, the reduced search's stands."""
    found = reduced.violation
    assert found is not None
    depth = len(found.trace) if found.doomed_after is None else None
    full = _search(config, depth, max_states, progress, time.perf_counter(), compact_after, False)
    if full.violation is None:
        reduced.notes.append("trace from the reduced search: the search without it was cut short")
        return reduced
    full.seconds += reduced.seconds
    full.notes.append(
        f"partial-order reduction found the violation in {reduced.states} states; "
        "the trace is from a search without it"
    )
    return full


def _search(
    config: WorldConfig,
    max_depth: int | None,
    max_states: int,
    progress: ProgressFn | None,
    t0: float,
    compact_after: int,
    reduce: bool,
) -> CheckResult:
    """Breadth first over flat state keys (:meth:`World.freeze`); one scratch world is
    thawed into each state before each step."""
    result = CheckResult(config)
    world = World(config)
    root = world.freeze()
    # One table per position: equality merges False with 0, so parts from different
    # fields must never meet (the compiled build checks a bool field holds a bool).
    tables: list[dict[Any, Any]] = [{} for _ in root]
    shares = [table.setdefault for table in tables]
    root = _shared(root, shares)
    keys: dict[Any, int] = {root: 0}
    states: list[tuple[Any, ...] | None] = [root]
    compacted = False
    parent = [-1]
    via: list[Action | None] = [None]
    depth = [0]
    succ: list[list[int]] = [[]]
    succ_act: list[list[Action]] = [[]]
    goal = [_is_goal(world)]
    asleep = [_is_waiting(world)]
    rebooted = [world.rebooted]
    truncated: list[int] = []
    broken = world.broken()
    if broken is not None:
        result.violation = _counterexample(config, [], broken[0], broken[1])
        return _finish(result, t0, len(states))
    queue: deque[int] = deque([0])
    while queue:
        i = queue.popleft()
        if max_depth is not None and depth[i] >= max_depth:
            truncated.append(i)
            result.complete = False
            continue
        state = states[i]
        assert state is not None
        if compacted:
            states[i] = None  # expanded: only its hash stays (in keys)
        world.thaw(state)
        actions = world.actions()
        # Partial-order reduction: expand an ample set only; the cycle proviso (for a
        # breadth-first search) expands fully a state whose ample set leads back to a state
        # already expanded (or to itself), so no cycle of the reduced graph postpones the
        # other processes' steps for ever (docs/check.md).
        ample = world.ample(actions) if reduce else None
        todo = actions if ample is None else ample
        result.ample_states += ample is not None
        out = succ[i]
        n = 0
        while n < len(todo):
            action = todo[n]
            if n:
                world.thaw(state)
            n += 1
            result.transitions += 1
            try:
                world.step(action)
            except Violation as violation:
                path = [*_path(parent, via, i), action]
                result.violation = _counterexample(config, path, violation.prop, violation.detail)
                return _finish(result, t0, len(states), max(depth))
            # Hash-consed: a part equal to one seen before is that object (most states share
            # most of their parts), so a stored state costs its own parts only.
            key = _shared(world.freeze(), shares)
            j = keys.get(hash(key) if compacted else key)
            if j is None:
                j = len(states)
                keys[hash(key) if compacted else key] = j
                states.append(key)
                if not compacted and j + 1 >= compact_after:
                    keys = {hash(k): v for k, v in keys.items()}
                    for done in range(i):
                        states[done] = None  # states before i in BFS order are expanded
                    compacted = True
                parent.append(i)
                via.append(action)
                depth.append(depth[i] + 1)
                succ.append([])
                succ_act.append([])
                goal.append(_is_goal(world))
                asleep.append(_is_waiting(world))
                rebooted.append(world.rebooted)
                broken = world.broken()
                if broken is not None:
                    path = _path(parent, via, j)
                    result.violation = _counterexample(config, path, broken[0], broken[1])
                    return _finish(result, t0, len(states), max(depth))
                if len(states) >= max_states:
                    # Stop: the states not (fully) expanded count as able to finish.
                    result.complete = False
                    truncated.extend(queue)
                    truncated.extend((i, j))
                    queue.clear()
                    break
                queue.append(j)
                if progress is not None and j % 10_000 == 0:
                    progress(j, depth[j])
            out.append(j)
            succ_act[i].append(action)
            if todo is ample and j <= i:
                todo = ample + [a for a in actions if a not in ample]  # the proviso
    result.goal_states = sum(goal)
    stuck = _cannot_finish(succ, goal, asleep, rebooted, truncated)
    if stuck is not None:
        path = _path(parent, via, stuck)
        replayed = _replay(config, path)
        prop, detail = _why_stuck(replayed)
        tail = _continuation(stuck, succ, succ_act)
        found = _counterexample(config, [*path, *tail], prop, detail)
        result.violation = Counterexample(found.prop, found.detail, found.trace, len(path))
    return _finish(result, t0, len(states), max(depth))


def _shared(key: tuple[Any, ...], shares: Sequence[Callable[[Any, Any], Any]]) -> tuple[Any, ...]:
    """``key`` with each part replaced by an equal part seen before at that position."""
    return tuple([share(part, part) for share, part in zip(shares, key, strict=True)])


def _finish(result: CheckResult, t0: float, states: int, depth: int = 0) -> CheckResult:
    result.states = states
    result.depth = depth
    result.seconds = time.perf_counter() - t0
    return result


def _is_goal(world: World) -> bool:
    return all(task.state == TaskState.DONE for task in world.tasks)


def _is_waiting(world: World) -> bool:
    return any(
        task.state is TaskState.SLEEPING_APF or task.halt_ctx is not None for task in world.tasks
    )


def _path(parent: list[int], via: list[Action | None], i: int) -> list[Action]:
    path: list[Action] = []
    while i > 0:
        action = via[i]
        assert action is not None
        path.append(action)
        i = parent[i]
    path.reverse()
    return path


def _cannot_finish(
    succ: list[list[int]],
    goal: list[bool],
    asleep: list[bool],
    rebooted: list[bool],
    truncated: list[int],
) -> int | None:
    """The shallowest state from which no state with every task done is reachable,
    preferring one where a task already waits for its page (the readable counterexample).

    States the search did not expand (depth or size limit) count as able to finish. A
    reboot ends the old tasks without finishing them: it is no way out, and the states
    after it (a new kernel with no tasks) are not judged.
    """
    preds: list[list[int]] = [[] for _ in succ]
    for i, out in enumerate(succ):
        for j in out:
            if rebooted[j] and not rebooted[i]:
                continue
            preds[j].append(i)
    can = bytearray(len(succ))
    stack = [i for i, g in enumerate(goal) if g]
    stack.extend(truncated)
    for i in stack:
        can[i] = 1
    while stack:
        j = stack.pop()
        for i in preds[j]:
            if not can[i]:
                can[i] = 1
                stack.append(i)
    first = None
    for i in range(len(succ)):  # BFS order: the first is a shallowest one
        if not can[i]:
            if asleep[i]:
                return i  # the shallowest doomed state where a task already waits
            if first is None:
                first = i
    return first


_PREFERENCE = (Step.WORKER, Step.SYNC_DONE, Step.ENTER, Step.HANDLE)


def _continuation(
    start: int, succ: list[list[int]], succ_act: list[list[Action]], limit: int = 20
) -> list[Action]:
    """One way the doomed run goes on (completions first), until it only revisits states:
    it shows the page-ready arriving and still waking nobody."""
    seen = {start}
    path: list[Action] = []
    i = start
    for _ in range(limit):
        options = [(a, j) for a, j in zip(succ_act[i], succ[i], strict=True) if j not in seen]
        if not options:
            break
        options.sort(key=lambda aj: _rank(aj[0]))
        action, i = options[0]
        seen.add(i)
        path.append(action)
    return path


def _rank(action: Action) -> int:
    kind = action[0]
    return _PREFERENCE.index(kind) if kind in _PREFERENCE else len(_PREFERENCE)


def _why_stuck(world: World) -> tuple[str, str]:
    asleep = [t for t, task in enumerate(world.tasks) if task.state is TaskState.SLEEPING_APF]
    halted = [t for t, task in enumerate(world.tasks) if task.halt_ctx is not None]
    if asleep:
        return "live: task asleep forever", (
            f"task{asleep[0]} sleeps on an APF token and no interleaving from here wakes it "
            "(its page-ready was lost or never sent)"
        )
    if halted:
        return "live: halted waiter never woken", (
            f"task{halted[0]} spins in the halted wait (wfi until its node is unhashed) and "
            "no interleaving from here unhashes its node"
        )
    return "live: no way to finish", (
        "from here no interleaving lets every task finish (a deadlock or a livelock)"
    )


def _replay(config: WorldConfig, path: list[Action]) -> World:
    world = World(config)
    for action in path:
        world.step(action)
    return world


def _counterexample(
    config: WorldConfig, path: list[Action], prop: str, detail: str
) -> Counterexample:
    """Replay ``path`` from the start, recording what each step did in kernel terms."""
    world = World(config)
    steps: list[TraceStep] = []
    for action in path:
        text = world.describe(action)
        world.log = []
        try:
            world.step(action)
        except Violation:
            steps.append(TraceStep(text, tuple(world.log)))
            break
        steps.append(TraceStep(text, tuple(world.log)))
    return Counterexample(prop, detail, tuple(steps))
