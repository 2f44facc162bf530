"""State invariants of the async PF protocols (spec §8.3), over the explicit protocol state.

Each check reads the same objects the simulator drives: the generic core's per-vCPU lists
(:class:`~apfsim.host.async_pf.VcpuAsyncPf`), the arch state of the variant, and the guest
driver's sleep table. :func:`check_state` returns the first broken property as
``(name, detail)``, or None; the model checker calls it on every state it reaches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apfsim.check.world import Mode, TaskState
from apfsim.guest.kvm_apf_arm64 import Arm64ApfGuest
from apfsim.guest.kvm_apf_x86 import WAKE_ALL_TOKEN, X86ApfGuest
from apfsim.host.async_pf import ASYNC_PF_PER_VCPU, WorkState
from apfsim.protocols.arm64_sdei_ppi import Arm64SdeiPpiGuest, Arm64SdeiPpiHost
from apfsim.protocols.common import HostBase
from apfsim.protocols.x86 import X86Host
from apfsim.protocols.x86_legacy import X86LegacyHost

if TYPE_CHECKING:
    from apfsim.check.world import World

__all__ = ["INVARIANTS", "Broken", "check_guest", "check_state", "check_vcpu"]

Broken = tuple[str, str] | None

INVARIANTS: dict[str, str] = {
    "I1": "tokens of live items are unique per vCPU; x86: never 0 or ~0 (B9)",
    "I2": "queued == items on queue (+ wake-all items on done) <= 64; every queued item is "
    "running or done; a gfn is in the hash iff a non-wake-all item for it is queued",
    "I3": "x86: a page-ready is pending only while its token is in the slot (one in flight)",
    "I4": "a not-present reaches the guest only where it can take it (user mode, IRQs on, no "
    "pending event; arm64: not where ELR/ESR/FAR are unsaved) (B1, B4)",
    "I6": "a sleeping task has a node its page-ready can find; no token has two nodes; no "
    "dummy node is left when every task is done",
    "I8": "the host writes no APF data of a CPU whose kernel has not enabled async PF (B14)",
    "I9": "x86 / SDEI: a ready request on a running vCPU has a kick or a pending ACK (B12)",
    "live": "every task can still finish: no task asleep forever, no lost page-ready (B5, "
    "B8, dummy-drop)",
}


def check_state(world: World) -> Broken:
    """The first invariant ``world`` breaks, or None."""
    host, guest = world.host, world.guest
    for v, vc in enumerate(world.vcpus):
        broken = check_vcpu(host, v, vc.mode == Mode.GUEST)
        if broken is not None:
            return broken
    waiting = [
        (t, task.wait_cpu)
        for t, task in enumerate(world.tasks)
        if task.state in (TaskState.SLEEPING, TaskState.HALTED)
    ]
    all_done = all(task.state == TaskState.DONE for task in world.tasks)
    return check_guest(guest, waiting, all_done)


def check_vcpu(host: object, v: int, in_guest: bool, lists: bool = True) -> Broken:
    """The host side of vCPU ``v``: I3 and I9, and with ``lists`` also I1 and I2 (the
    generic core's lists); ``in_guest``: the vCPU runs guest code."""
    if not isinstance(host, HostBase):
        return None
    return (_core(host, v) if lists else None) or _arch(host, v, in_guest)


def _core(host: HostBase, v: int) -> Broken:
    # Token 0 means "slot free" only since page-ready is an interrupt with a token slot.
    x86_tokens = isinstance(host, X86Host) and not isinstance(host, X86LegacyHost)
    apf = host.apf[v]
    arch = getattr(host, "arch", None)
    if not apf.queued and not apf.queue and not apf.done:  # the common case, made cheap
        if arch is not None and len(arch[v].gfns) and _apf_on(host, v):
            return "I2", f"vCPU{v}: gfns left in the hash with nothing queued"
        return None
    wake_alls = sum(1 for w in apf.done if w.wakeup_all)
    if apf.queued != len(apf.queue) + wake_alls or apf.queued > ASYNC_PF_PER_VCPU:
        return "I2", f"vCPU{v}: queued={apf.queued} but {len(apf.queue)} items queued"
    tokens = []
    for work in apf.queue:
        if work.state not in (WorkState.RUNNING, WorkState.DONE):
            return "I2", f"vCPU{v}: a {work.state.value} item is still on the queue"
        tokens.append(work.token)
    if len(set(tokens)) != len(tokens):
        return "I1", f"vCPU{v}: two live items share a token ({sorted(tokens)})"
    for token in tokens:
        if token == WAKE_ALL_TOKEN or (x86_tokens and token == 0):
            return "I1", f"vCPU{v}: live item with token {token:#x} (reserved value)"
    # While disabled, RFCv2 keeps stale gfns until the next enable resets the hash (the
    # gate is checked before the lookup, so they are never used).
    if arch is not None and _apf_on(host, v):
        hashed = arch[v].gfns
        queued_gfns = {w.gfn for w in apf.queue if not w.wakeup_all}
        if len(hashed) != len(queued_gfns) or not all(hashed.find(g) for g in queued_gfns):
            return "I2", f"vCPU{v}: the gfn hash and the queue disagree"
    return None


def _apf_on(host: HostBase, v: int) -> bool:
    if isinstance(host, X86Host):
        return host.apf_enabled(v)
    return bool(getattr(host.arch[v], "enabled", True))  # type: ignore[attr-defined]


def _arch(host: HostBase, v: int, in_guest: bool) -> Broken:
    if isinstance(host, X86Host):
        arch = host.arch[v]
        if arch.pageready_pending and arch.block.token == 0 and host.apf_enabled(v):
            return "I3", f"vCPU{v}: pageready_pending with an empty token slot"
    # x86 and SDEI kick on the first completion unless a page-ready is pending (whose ACK
    # re-checks): a request left on a running vCPU otherwise waits for an unrelated exit.
    if (
        isinstance(host, X86Host | Arm64SdeiPpiHost)
        and in_guest
        and host.request_pending(v)
        and not host.arch[v].pageready_pending
        and host.apf[v].done
        and host.kvm_arch_can_dequeue_async_page_present(v)
    ):
        return "I9", (
            f"vCPU{v}: a page-ready request is set while the vCPU runs in the guest, "
            "nobody kicked it and no ACK is pending: the page-ready waits for an "
            "unrelated exit (missed kick)"
        )
    return None


def check_guest(guest: object, waiting: list[tuple[int, int]], all_done: bool) -> Broken:
    """The guest driver (I6): ``waiting`` lists (task, CPU it waits on) of every task asleep
    or in the halted wait; ``all_done``: every task has finished."""
    tokens: list[int] = []
    dummies = 0
    has_node: set[tuple[int, int]] | None = None  # (cpu or -1, task) with a live node
    if isinstance(guest, X86ApfGuest):
        has_node = set()
        for bucket in guest.async_pf_sleepers:
            for node in bucket:
                tokens.append(node.token)
                if node.dummy:
                    dummies += 1
                else:
                    has_node.add((-1, node.task))  # one global table
    elif isinstance(guest, Arm64ApfGuest):
        has_node = set()
        for cpu, head in enumerate(guest.apf_head):
            cpu_tokens = [n.token for n in head]
            if len(set(cpu_tokens)) != len(cpu_tokens):
                return "I6", f"CPU{cpu}: two sleep nodes for one token"
            for arm_node in head:
                if arm_node.dummy:
                    dummies += 1
                else:
                    has_node.add((cpu, arm_node.task))
    elif isinstance(guest, Arm64SdeiPpiGuest):
        has_node = set()
        for cpu, waiting_tokens in enumerate(guest.waiting):
            tokens.extend(waiting_tokens)
            has_node.update((cpu, task) for task in waiting_tokens.values())
    if has_node is not None:
        x86 = isinstance(guest, X86ApfGuest)
        for task, cpu in waiting:
            if ((-1 if x86 else cpu), task) not in has_node:
                return "I6", (
                    f"task{task} waits for its page but has no node left to be found: a "
                    "lost wake-up (it sleeps forever)"
                )
    if len(set(tokens)) != len(tokens):
        return "I6", "two sleep nodes for one token"
    if dummies and all_done:
        return "I6", f"{dummies} dummy node(s) left in the sleep table: never consumed (leak)"
    return None
