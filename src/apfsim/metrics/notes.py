"""Notes on results a reader would otherwise misread: a protocol that injected no async PF
although the workload faulted reads as "APF does nothing"; say why, from its counters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from apfsim.metrics.results import ProtocolResult

__all__ = ["no_injection_note"]

# SyncCause values (apfsim.ports) -> why a fault that needed I/O was not made async.
_REASONS = {
    "gated_context": "in kernel mode, which its guest gates (async PF from user mode only)",
    "window": "taken with the PC in the host's no-inject window (the exception vectors)",
    "reason_busy": "taken before the guest had consumed the previous signal (reason != 0)",
    "irqs_off": "taken with interrupts off",
    "queue_full": "taken with the vCPU's async PF queue full",
    "guest_declined": "declined by the guest, which could not sleep there",
    "exception_pending": "taken with an event awaiting (re)injection",
    "no_apf": "taken before the guest had enabled async PF",
}


def _hint(scenario: dict[str, Any], reason: str) -> str:
    """What to change to see injections, when the scenario says it."""
    if reason != "gated_context":
        return ""
    hogs = [t for t in scenario.get("tasks", []) if t.get("kind") == "memory_hog"]
    if any(t.get("passes", 1) >= 2 for t in hogs):
        when = " (after about 30 s)" if scenario.get("name") == "rfcv2-2020" else ""
        return (
            "; run longer (--duration): the memory hog faults from user mode only in its "
            f"second pass, after the kernel has zeroed its pages{when}"
        )
    return "; give the workload user-mode faults or run longer (--duration)"


def no_injection_note(results: Sequence[ProtocolResult], scenario: dict[str, Any]) -> str | None:
    """One line on why the runs of one protocol injected no not-present signal although
    faults needed I/O; None if they injected some, or never could (no async PF by design,
    or faults made async by artificial halts)."""
    if not results:
        return None
    protocol = results[0].protocol
    apf: dict[str, int] = {}
    for r in results:
        for key, value in r.apf.items():
            apf[key] = apf.get(key, 0) + value
    needs_io = sum(int(r.faults.get("needs_io", 0)) for r in results)
    fallbacks = apf.get("sync_fallbacks", 0)
    if apf.get("not_present_injected", 0) or not needs_io or not fallbacks:
        return None
    causes = {
        key.removeprefix("sync_fallback_"): n
        for key, n in apf.items()
        if key.startswith("sync_fallback_") and n
    }
    if not causes or set(causes) == {"no_apf"}:
        return None  # no async PF (sync, halt-only, memory-fault-exit): nothing to explain
    reason, n = max(causes.items(), key=lambda item: item[1])
    how = _REASONS.get(reason, f"synchronous ({reason})")
    share = f"all {n}" if n == needs_io else f"{n} of {needs_io}"
    return (
        f"{protocol} injected no async PF: {share} faults that needed I/O so far were {how}"
        f"{_hint(scenario, reason)}"
    )
