"""State invariants of the async PF protocols (spec §8.3), over the explicit protocol state.

Each check reads the objects both drivers of the run loop share: the generic core's per-vCPU
lists (:class:`~apfsim.host.async_pf.VcpuAsyncPf`), the variant's gfn table, and the guest
driver's sleep records (``wait_nodes``). What only one design has is the variant's own hook
(``check_arch``: I3, I9). The simulator calls these where the kernel would assert; the model
checker on every state it reaches. Neither a variant's name nor its type is tested here.
"""

from __future__ import annotations

from typing import Any

from apfsim.abi.x86 import WAKE_ALL_TOKEN
from apfsim.host.async_pf import ASYNC_PF_PER_VCPU, AsyncPf, WorkState
from apfsim.ports import Broken, GuestProtocol, HostProtocol
from apfsim.protocols.common import GfnHash, HostBase

__all__ = ["INVARIANTS", "Broken", "SleepLedger", "check_guest", "check_vcpu"]

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


def check_vcpu(host: HostProtocol, v: int, in_guest: bool, lists: bool = True) -> Broken:
    """The host side of vCPU ``v``: with ``lists`` the generic core's lists (I1, I2), then
    the variant's own (I3, I9); ``in_guest``: the vCPU runs guest code."""
    if lists and isinstance(host, HostBase):
        broken = _core(host, v)
        if broken is not None:
            return broken
    return host.check_arch(v, in_guest)


def _core(host: HostBase[Any], v: int) -> Broken:
    apf = host.apf[v]
    gfns = host.arch[v].gfns
    queue = apf.queue
    queued = apf.queued
    if not queued and not queue and not apf.done:  # the common case, made cheap
        if gfns.used and host.apf_on(v):
            return "I2", f"vCPU{v}: gfns left in the hash with nothing queued"
        return None
    wake_alls = 0
    for work in apf.done:
        if work.wakeup_all:
            wake_alls += 1
    if queued != len(queue) + wake_alls or queued > ASYNC_PF_PER_VCPU:
        return "I2", f"vCPU{v}: queued={queued} but {len(queue)} items queued"
    if len(queue) == 1:  # the next commonest: what follows, for one item
        work = queue[0]
        state = work.state
        if state is not _RUNNING and state is not _DONE:
            return "I2", f"vCPU{v}: a {state.value} item is still on the queue"
        token = work.token
        if token == WAKE_ALL_TOKEN or (token == 0 and host.reserved_token_zero):
            return "I1", f"vCPU{v}: live item with token {token:#x} (reserved value)"
        if (
            gfns.used != 0 if work.wakeup_all else gfns.used != 1 or not gfns.find(work.gfn)
        ) and host.apf_on(v):
            return "I2", f"vCPU{v}: the gfn hash and the queue disagree"
        return None
    return _queue_scan(host, v, queue, gfns)


def _queue_scan(host: HostBase[Any], v: int, queue: list[AsyncPf], gfns: GfnHash) -> Broken:
    """I1 and the queue's half of I2, item by item (``_core`` for any queue length)."""
    tokens = set()
    queued_gfns = set()
    for work in queue:
        state = work.state
        if state is not _RUNNING and state is not _DONE:
            return "I2", f"vCPU{v}: a {state.value} item is still on the queue"
        tokens.add(work.token)
        if not work.wakeup_all:
            queued_gfns.add(work.gfn)
    if host.unique_tokens and len(tokens) != len(queue):
        listed = sorted(work.token for work in queue)
        return "I1", f"vCPU{v}: two live items share a token ({listed})"
    for token in (WAKE_ALL_TOKEN, 0) if host.reserved_token_zero else (WAKE_ALL_TOKEN,):
        if token in tokens:
            return "I1", f"vCPU{v}: live item with token {token:#x} (reserved value)"
    # While disabled, RFCv2 keeps stale gfns until the next enable resets the hash (the
    # gate is checked before the lookup, so they are never used).
    if (
        gfns.used != len(queued_gfns) or not all(gfns.find(g) for g in queued_gfns)
    ) and host.apf_on(v):
        return "I2", f"vCPU{v}: the gfn hash and the queue disagree"
    return None


_RUNNING, _DONE = WorkState.RUNNING, WorkState.DONE


def check_guest(guest: GuestProtocol, waiting: list[tuple[int, int]], all_done: bool) -> Broken:
    """The guest driver (I6): ``waiting`` lists (task, CPU it waits on) of every task asleep
    or in the halted wait's HLT/WFI itself (elsewhere the halted loop tests its node before
    it halts again); ``all_done``: every task has finished."""
    tokens: set[tuple[int, int]] = set()  # (scope, token) with a node
    has_node: set[tuple[int, int]] = set()  # (scope, task) with a live node
    dummies = 0
    global_scope = False
    for scope, task, token, dummy in guest.wait_nodes():
        if (scope, token) in tokens:
            where = "" if scope < 0 else f"CPU{scope}: "
            return "I6", f"{where}two sleep nodes for one token"
        tokens.add((scope, token))
        if scope < 0:
            global_scope = True
        if dummy:
            dummies += 1
        else:
            has_node.add((scope, task))
    if not waiting and not dummies:
        return None
    for task, cpu in waiting:
        if (-1 if global_scope else cpu, task) not in has_node:
            return "I6", (
                f"task{task} waits for its page but has no node left to be found: a "
                "lost wake-up (it sleeps forever)"
            )
    if dummies and all_done:
        return "I6", f"{dummies} dummy node(s) left in the sleep table: never consumed (leak)"
    return None


class SleepLedger:
    """I6's counts of the guest driver's sleep records, kept as the driver links and
    unlinks each one (its ``hlist_add_head`` / ``hlist_del_init`` on the sleep lists, the
    s390 ``list_add`` / ``list_del`` on ``pfault_list``): an :class:`~apfsim.ports.SleepLog`.

    What :func:`check_guest` counts by walking every record, here at O(1) per change:
    ``(scope, token)`` keys held by two records or more, dummies, records in the global scope,
    and each ``(scope, task)``'s real (non-dummy) records. ``unlinked`` collects the tasks that
    lost their last real record in a scope since the checker last cleared it."""

    __slots__ = (
        "_per_task",
        "_per_token",
        "dummies",
        "global_nodes",
        "nodes",
        "shared_tokens",
        "unlinked",
    )

    def __init__(self) -> None:
        self.nodes = 0
        self.global_nodes = 0
        self.dummies = 0
        self.shared_tokens = 0
        self._per_token: dict[tuple[int, int], int] = {}
        self._per_task: dict[tuple[int, int], int] = {}
        self.unlinked: set[int] = set()

    def node_added(self, scope: int, task: int, token: int, dummy: bool) -> None:
        key = (scope, token)
        count = self._per_token.get(key, 0) + 1
        self._per_token[key] = count
        if count == 2:
            self.shared_tokens += 1
        self.nodes += 1
        if scope < 0:
            self.global_nodes += 1
        if dummy:
            self.dummies += 1
            return
        key = (scope, task)
        self._per_task[key] = self._per_task.get(key, 0) + 1

    def node_removed(self, scope: int, task: int, token: int, dummy: bool) -> None:
        key = (scope, token)
        count = self._per_token[key] - 1
        if count:
            self._per_token[key] = count
            if count == 1:
                self.shared_tokens -= 1
        else:
            del self._per_token[key]
        self.nodes -= 1
        if scope < 0:
            self.global_nodes -= 1
        if dummy:
            self.dummies -= 1
            return
        key = (scope, task)
        count = self._per_task[key] - 1
        if count:
            self._per_task[key] = count
        else:
            del self._per_task[key]
            self.unlinked.add(task)

    def has_node(self, task: int, cpu: int) -> bool:
        """Whether ``task``, waiting on ``cpu``, has a real record where its page-ready
        looks: the global table if the driver has one, else ``cpu``'s list (as
        :func:`check_guest` decides)."""
        return (-1 if self.global_nodes else cpu, task) in self._per_task
