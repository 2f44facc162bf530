"""The generic lifecycle (model of ``virt/kvm/async_pf.c``) over a recording fake ArchHooks."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from apfsim.host.async_pf import (
    ASYNC_PF_PER_VCPU,
    AsyncPf,
    VcpuAsyncPf,
    WorkState,
    async_pf_execute,
    kvm_async_pf_wakeup_all,
    kvm_check_async_pf_completion,
    kvm_clear_async_pf_completion_queue,
    kvm_setup_async_pf,
)

WAKE_ALL = 0xFFFF_FFFF


@dataclass
class RecordingHooks:
    """ArchHooks that log every call. ``inject`` is what not_present reports;
    ``dequeue_budget`` (None = unlimited) is how many dequeues are allowed."""

    inject: bool = True
    dequeue_budget: int | None = None
    calls: list[tuple[str, int]] = field(default_factory=list)  # (hook, id(work) or -1)

    def kvm_arch_async_page_not_present(self, vcpu_id: int, work: AsyncPf) -> bool:
        self.calls.append(("not_present", id(work)))
        return self.inject

    def kvm_arch_async_page_present(self, vcpu_id: int, work: AsyncPf) -> None:
        self.calls.append(("present", id(work)))

    def kvm_arch_async_page_ready(self, vcpu_id: int, work: AsyncPf) -> None:
        self.calls.append(("ready", id(work)))

    def kvm_arch_can_dequeue_async_page_present(self, vcpu_id: int) -> bool:
        if self.dequeue_budget is None:
            return True
        if self.dequeue_budget == 0:
            return False
        self.dequeue_budget -= 1
        return True

    def kvm_arch_async_page_present_queued(self, vcpu_id: int) -> None:
        self.calls.append(("present_queued", -1))

    def count(self, hook: str) -> int:
        return sum(1 for name, _ in self.calls if name == hook)


def setup(apf: VcpuAsyncPf, hooks: RecordingHooks, gfn: int) -> AsyncPf:
    work = kvm_setup_async_pf(apf, hooks, gfn, token=gfn << 16, now_ns=gfn)
    assert work is not None
    return work


# ---------------------------------------------------------------------- kvm_setup_async_pf


def test_setup_queues_until_async_pf_per_vcpu() -> None:
    """``if (vcpu->async_pf.queued >= ASYNC_PF_PER_VCPU) return 0;``"""
    apf, hooks = VcpuAsyncPf(vcpu_id=3), RecordingHooks()
    works = [setup(apf, hooks, gfn) for gfn in range(ASYNC_PF_PER_VCPU)]
    assert apf.queued == ASYNC_PF_PER_VCPU == 64 and apf.queue == works
    assert kvm_setup_async_pf(apf, hooks, 999, token=1, now_ns=0) is None
    assert apf.queued == 64 and len(apf.queue) == 64
    assert hooks.count("not_present") == 64  # not called for the refused one
    assert all(w.vcpu_id == 3 and w.state is WorkState.RUNNING for w in works)


def test_setup_records_notpresent_injected_from_hook() -> None:
    """``work->notpresent_injected = kvm_arch_async_page_not_present(vcpu, work)``."""
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks(inject=False)
    refused = setup(apf, hooks, 1)
    hooks.inject = True
    injected = setup(apf, hooks, 2)
    assert not refused.notpresent_injected and injected.notpresent_injected
    assert hooks.calls == [("not_present", id(refused)), ("not_present", id(injected))]


def test_cr2_or_gpa_is_gfn_page_address() -> None:
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks()
    assert setup(apf, hooks, 0x1234).cr2_or_gpa == 0x1234000


# ---------------------------------------------------------------------- async_pf_execute


def test_execute_reports_first_and_calls_present_queued_once_per_transition() -> None:
    """``first = list_empty(&done)``; present_queued only when done goes non-empty."""
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks()
    a, b, c = (setup(apf, hooks, g) for g in (1, 2, 3))
    assert async_pf_execute(apf, hooks, a) is True
    assert async_pf_execute(apf, hooks, b) is False
    assert hooks.count("present_queued") == 1
    assert (a.state, b.state, c.state) == (WorkState.DONE, WorkState.DONE, WorkState.RUNNING)
    assert list(apf.done) == [a, b] and apf.queue == [a, b, c]  # still on queue
    kvm_check_async_pf_completion(apf, hooks)
    assert async_pf_execute(apf, hooks, c) is True
    assert hooks.count("present_queued") == 2


def test_execute_of_cancelled_or_delivered_item_is_ignored() -> None:
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks()
    work = setup(apf, hooks, 1)
    kvm_clear_async_pf_completion_queue(apf)
    assert async_pf_execute(apf, hooks, work) is False
    assert work.state is WorkState.CANCELLED and not apf.done
    assert hooks.count("present_queued") == 0
    other = setup(apf, hooks, 2)
    async_pf_execute(apf, hooks, other)
    kvm_check_async_pf_completion(apf, hooks)
    assert async_pf_execute(apf, hooks, other) is False
    assert other.state is WorkState.DELIVERED and not apf.done


# ---------------------------------------------------------------------- check_completion


def test_check_completion_delivers_fifo_with_ready_then_present() -> None:
    """Pop done's head; page_ready (prefault) then page_present; unlink; queued--."""
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks()
    works = [setup(apf, hooks, g) for g in (1, 2, 3)]
    for w in (works[1], works[2], works[0]):
        async_pf_execute(apf, hooks, w)
    hooks.calls.clear()
    delivered = kvm_check_async_pf_completion(apf, hooks)
    assert delivered == [works[1], works[2], works[0]]
    assert hooks.calls == [(hook, id(w)) for w in delivered for hook in ("ready", "present")]
    assert apf.queue == [] and not apf.done and apf.queued == 0
    assert all(w.state is WorkState.DELIVERED for w in works)


def test_check_completion_stops_when_can_dequeue_is_false() -> None:
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks(dequeue_budget=1)
    a, b = setup(apf, hooks, 1), setup(apf, hooks, 2)
    async_pf_execute(apf, hooks, a)
    async_pf_execute(apf, hooks, b)
    assert kvm_check_async_pf_completion(apf, hooks) == [a]
    assert list(apf.done) == [b] and apf.queue == [b] and apf.queued == 1
    assert kvm_check_async_pf_completion(apf, hooks) == []
    hooks.dequeue_budget = None
    assert kvm_check_async_pf_completion(apf, hooks) == [b]


def test_check_completion_with_nothing_done_is_a_noop() -> None:
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks()
    setup(apf, hooks, 1)
    hooks.calls.clear()
    assert kvm_check_async_pf_completion(apf, hooks) == []
    assert hooks.calls == [] and apf.queued == 1


# ---------------------------------------------------------------------- wakeup_all / clear


def test_wakeup_all_only_when_done_is_empty() -> None:
    """kvm_async_pf_wakeup_all: ``if (!list_empty_careful(&vcpu->async_pf.done)) return 0``."""
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks()
    work = setup(apf, hooks, 1)
    async_pf_execute(apf, hooks, work)
    assert kvm_async_pf_wakeup_all(apf, hooks, WAKE_ALL) is None
    assert apf.queued == 1 and list(apf.done) == [work]
    kvm_check_async_pf_completion(apf, hooks)
    hooks.calls.clear()
    item = kvm_async_pf_wakeup_all(apf, hooks, WAKE_ALL)
    assert item is not None
    assert item.wakeup_all and item.token == WAKE_ALL and item.state is WorkState.DONE
    assert list(apf.done) == [item] and apf.queue == [] and apf.queued == 1
    assert hooks.calls == [("present_queued", -1)]


def test_wake_all_item_delivery_skips_prefault_and_queue() -> None:
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks()
    item = kvm_async_pf_wakeup_all(apf, hooks, WAKE_ALL)
    hooks.calls.clear()
    assert kvm_check_async_pf_completion(apf, hooks) == [item]
    assert item is not None and hooks.calls == [("present", id(item))]
    assert apf.queued == 0 and item.state is WorkState.DELIVERED


def test_wakeup_all_is_not_capped_by_async_pf_per_vcpu() -> None:
    """As in the kernel, the wake-all item ignores the limit: 64 running + 1 = 65. (The RFCv2
    host only calls it right after clearing, on enable, so its queue is then empty.)"""
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks()
    for gfn in range(ASYNC_PF_PER_VCPU):
        setup(apf, hooks, gfn)
    assert kvm_async_pf_wakeup_all(apf, hooks, WAKE_ALL) is not None
    assert apf.queued == ASYNC_PF_PER_VCPU + 1


def test_clear_cancels_everything() -> None:
    """kvm_clear_async_pf_completion_queue: queue, done (incl. wake-all), queued = 0."""
    apf, hooks = VcpuAsyncPf(vcpu_id=0), RecordingHooks()
    running, done, delivered = (setup(apf, hooks, g) for g in (1, 2, 3))
    async_pf_execute(apf, hooks, delivered)
    kvm_check_async_pf_completion(apf, hooks)
    wake_all = kvm_async_pf_wakeup_all(apf, hooks, WAKE_ALL)
    async_pf_execute(apf, hooks, done)
    cancelled = kvm_clear_async_pf_completion_queue(apf)
    assert set(map(id, cancelled)) == {id(running), id(done), id(wake_all)}
    assert all(w.state is WorkState.CANCELLED for w in cancelled)
    assert delivered.state is WorkState.DELIVERED
    assert apf.queue == [] and not apf.done and apf.queued == 0
    assert kvm_check_async_pf_completion(apf, hooks) == []


# ---------------------------------------------------------------------- state machine


class AsyncPfLifecycle(RuleBasedStateMachine):
    """Random interleavings of the core's entry points; invariants after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.apf = VcpuAsyncPf(vcpu_id=0)
        self.hooks = RecordingHooks()
        self.items: list[AsyncPf] = []
        self.next_gfn = 0
        self.transitions_to_nonempty = 0

    @rule(inject=st.booleans())
    def setup(self, inject: bool) -> None:
        self.hooks.inject = inject
        full = self.apf.queued >= ASYNC_PF_PER_VCPU
        work = kvm_setup_async_pf(self.apf, self.hooks, self.next_gfn, self.next_gfn, 0)
        self.next_gfn += 1
        assert (work is None) == full
        if work is not None:
            assert work.notpresent_injected is inject
            self.items.append(work)

    @rule(n=st.integers(1, 40))
    def setup_burst(self, n: int) -> None:
        """Many faults in a row, so the 64 limit is reached within a short run."""
        for _ in range(n):
            self.setup(inject=True)

    @precondition(lambda self: any(w.state is WorkState.RUNNING for w in self.items))
    @rule(data=st.data())
    def execute(self, data: st.DataObject) -> None:
        running = [w for w in self.items if w.state is WorkState.RUNNING]
        work = data.draw(st.sampled_from(running))
        was_empty = not self.apf.done
        first = async_pf_execute(self.apf, self.hooks, work)
        assert first == was_empty
        self.transitions_to_nonempty += first

    @rule(data=st.data())
    def execute_stale(self, data: st.DataObject) -> None:
        """A worker finishing after its item was cancelled or delivered changes nothing."""
        stale = [w for w in self.items if w.state in (WorkState.CANCELLED, WorkState.DELIVERED)]
        if not stale:
            return
        work = data.draw(st.sampled_from(stale))
        state = work.state
        assert not async_pf_execute(self.apf, self.hooks, work)
        assert work.state is state

    @rule(budget=st.one_of(st.none(), st.integers(0, 3)))
    def check_completion(self, budget: int | None) -> None:
        self.hooks.dequeue_budget = budget
        expected = list(self.apf.done)
        if budget is not None:
            expected = expected[:budget]
        assert kvm_check_async_pf_completion(self.apf, self.hooks) == expected

    @precondition(lambda self: self.apf.queued < ASYNC_PF_PER_VCPU)
    @rule()
    def wakeup_all(self) -> None:
        was_empty = not self.apf.done
        item = kvm_async_pf_wakeup_all(self.apf, self.hooks, WAKE_ALL)
        assert (item is not None) == was_empty
        if item is not None:
            self.items.append(item)
            self.transitions_to_nonempty += 1

    @rule()
    def clear(self) -> None:
        before = {id(w) for w in self.apf.queue} | {id(w) for w in self.apf.done}
        cancelled = kvm_clear_async_pf_completion_queue(self.apf)
        assert {id(w) for w in cancelled} == before

    @invariant()
    def queued_counts_queue_and_done_wake_alls(self) -> None:
        wake_alls = sum(1 for w in self.apf.done if w.wakeup_all)
        assert self.apf.queued == len(self.apf.queue) + wake_alls
        assert self.apf.queued <= ASYNC_PF_PER_VCPU

    @invariant()
    def state_matches_list_membership(self) -> None:
        on_queue = {id(w) for w in self.apf.queue}
        on_done = {id(w) for w in self.apf.done}
        assert len(on_queue) == len(self.apf.queue) and len(on_done) == len(self.apf.done)
        for w in self.items:
            q, d = id(w) in on_queue, id(w) in on_done
            if w.state is WorkState.RUNNING:
                assert q and not d and not w.wakeup_all
            elif w.state is WorkState.DONE:
                assert d and q is not w.wakeup_all
            else:  # DELIVERED or CANCELLED: unlinked, owned by nobody
                assert not q and not d

    @invariant()
    def nothing_delivered_twice(self) -> None:
        presented = [key for name, key in self.hooks.calls if name == "present"]
        assert len(presented) == len(set(presented))
        delivered = {id(w) for w in self.items if w.state is WorkState.DELIVERED}
        assert set(presented) == delivered
        readied = {key for name, key in self.hooks.calls if name == "ready"}
        assert readied == {
            id(w) for w in self.items if w.state is WorkState.DELIVERED and not w.wakeup_all
        }

    @invariant()
    def present_queued_once_per_transition(self) -> None:
        assert self.hooks.count("present_queued") == self.transitions_to_nonempty


AsyncPfLifecycle.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None
)
TestAsyncPfLifecycle = AsyncPfLifecycle.TestCase
