"""Tracing attached to a simulation from outside: the traced vCPU thread and :func:`attach`.

The vCPU run loop with its tracepoints is used instead of :class:`Vcpu` only when a run is
traced, so an untraced run's exits and entries carry no tracing test at all; the composition
root (``apfsim.api``, ``apfsim.compare``) builds such a run with :func:`traced_simulation`.
"""

from __future__ import annotations

from apfsim.guest.context import GuestContext
from apfsim.host.vcpu import Vcpu
from apfsim.ports import Injection
from apfsim.scenario import Scenario
from apfsim.simulation import Simulation
from apfsim.trace.formats import ExitReason
from apfsim.trace.recorder import TraceOptions, TraceRecorder

__all__ = ["TracedVcpu", "attach", "traced_simulation"]


def traced_simulation(
    scenario: Scenario, protocol: str, seed: int, check: bool, trace: TraceOptions | None
) -> Simulation:
    """A simulation with ``trace``'s recorder attached (a plain one when nothing is traced)."""
    if trace is None or not trace.enabled:
        return Simulation(scenario, protocol, seed, check)
    sim = Simulation(scenario, protocol, seed, check, vcpu_type=TracedVcpu)
    attach(sim, trace)
    return sim


def attach(sim: Simulation, options: TraceOptions) -> TraceRecorder:
    """Hook a recorder into ``sim``'s vCPUs, guest CPUs, host I/O and run end."""
    recorder = TraceRecorder(sim, options)
    recorder.install()
    for vcpu, cpu in zip(sim.vcpus, sim.cpus, strict=True):
        vcpu.probe = cpu.probe = recorder
        if isinstance(vcpu, TracedVcpu):
            vcpu.tracer = recorder
    sim.io.probe = recorder
    sim.observers.append(recorder)
    return recorder


class TracedVcpu(Vcpu):
    """``trace_kvm_exit`` before each exit, ``trace_kvm_entry`` at each entry."""

    tracer: TraceRecorder

    def exit_async(self) -> None:
        assert self.tracer is not None
        self.tracer.kvm_exit(self.index, ExitReason.IRQ, self.guest.context())
        super().exit_async()

    def exit_for_guest_call(
        self, exits: int, handling_ns: int, ctx: GuestContext | None = None
    ) -> None:
        """The exit is taken in the handler that made the call (its frame just ended)."""
        assert self.tracer is not None
        where = ctx if ctx is not None else self.guest.context()
        self.tracer.kvm_exit(self.index, ExitReason.HVC, where)
        super().exit_for_guest_call(exits, handling_ns, ctx)

    def stage2_fault(self, gfn: int, ctx: GuestContext) -> None:
        assert self.tracer is not None
        self.tracer.kvm_exit(self.index, ExitReason.DABT, ctx)
        super().stage2_fault(gfn, ctx)

    def wfi(self, halt: bool) -> None:
        assert self.tracer is not None
        self.tracer.kvm_exit(self.index, ExitReason.WFX, self.guest.context())
        super().wfi(halt)

    def _entered(self, injections: list[Injection]) -> None:
        assert self.tracer is not None
        # arm64 KVM writes the exception vector into the PC before entry; VMX/SVM inject
        # the event in hardware, so x86's kvm_entry still shows the interrupted RIP.
        if self.tracer.arch == "arm64" and any(i.kind.synchronous for i in injections):
            ctx = self.tracer.vector_ctx
        else:
            ctx = self.guest.context()
        self.tracer.kvm_entry(self.index, ctx)
        super()._entered(injections)
