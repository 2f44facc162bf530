"""Scenario files: TOML validated with pydantic (unknown keys rejected, bounds enforced).

Every parameter has a default; docs/model.md gives each one's source or the reason for the
assumption. ``load_scenario`` accepts a built-in name or a path and raises
:class:`ScenarioError` with a one-line message naming the field, the value and what is
allowed.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import reprlib
import tomllib
import types
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from statistics import NormalDist
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from apfsim.host.costs import PresetName

__all__ = [
    "BUILTIN_SCENARIOS",
    "DEFAULT_SCENARIO",
    "MAX_DURATION_S",
    "MAX_MEMORY_MIB",
    "Scenario",
    "ScenarioError",
    "builtin_scenarios",
    "did_you_mean",
    "load_scenario",
    "one_line",
    "parse_toml",
    "scenario_to_toml",
    "set_path",
    "short_repr",
    "with_overrides",
]

DEFAULT_SCENARIO = "rfcv2-2020"
MIB_PAGES = 256  # 4 KiB pages per MiB
# The largest guest: its per-page host state is dense (4 bytes per 4 KiB page, plus a 4-byte
# shuffle at start-up), so 64 GiB costs about 250 MB of RSS per run (docs/model.md).
MAX_MEMORY_MIB = 65_536
MAX_DURATION_S = 86_400.0  # one day of simulated time
DAY_NS = 86_400 * 10**9  # bound of every time in ns: nothing in a run takes longer
DAY_US = 86_400 * 10**6
MAX_OFFSET = 1 << 32  # bound of the code-address offsets (a 4 GiB text is plenty)


class ScenarioError(ValueError):
    """A scenario that cannot be run; the message is one line, written for the user."""


class _Model(BaseModel):
    # strict: no bool for an int, no "1" for a number; no inf or NaN in any float.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class _LaterKeys(_Model):
    """A table with keys added after results schema 1 (``_later``): its JSON record (results
    files, sweep run keys) leaves them out while they hold their defaults, so a scenario
    that does not use them gives the same bytes and run keys as before they existed. The
    Python dump (``apfsim show``, overrides) keeps every key."""

    _later: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _record(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if info.mode_is_json():
            fields = type(self).model_fields
            for key in self._later:
                if getattr(self, key) == fields[key].default:
                    data.pop(key, None)
        return data


Ns = Annotated[int, Field(ge=0, le=DAY_NS)]
"""A CPU cost or time in ns: at most a day."""


class SchedConfig(_Model):
    """CFS tunables before log scaling by CPU count (Linux defaults)."""

    latency_ns: int = Field(6_000_000, gt=0, le=DAY_NS)
    min_granularity_ns: int = Field(750_000, gt=0, le=DAY_NS)
    wakeup_granularity_ns: Ns = 1_000_000
    gentle_fair_sleepers: bool = True
    wakeup_preemption: bool = True


class GuestCosts(_Model):
    """Guest-side CPU costs in ns (assumptions, see docs/model.md)."""

    vector_ns: Ns = 50
    kernel_entry_ns: Ns = 150
    apf_handler_ns: Ns = 1_000
    apf_wait_tail_ns: Ns = 200
    tick_handler_ns: Ns = 2_000
    ipi_handler_ns: Ns = 1_000
    context_switch_ns: Ns = 3_000
    guest_fault_ns: Ns = 1_000


PAGEBLOCK_ORDER = 9
"""``pageblock_order`` on x86-64 and arm64 with 4 KiB pages (2 MiB): the default page
reporting order (mm/page_reporting.c ``page_reporting_order``)."""


class PageReportingConfig(_Model):
    """The guest's free page reporting (mm/page_reporting.c), with its kernel constants."""

    # Blocks of 2**order pages are reported (PAGE_REPORTING_MIN_ORDER / page_reporting_order
    # = pageblock_order by default; virtio-balloon may lower it).
    order: int = Field(PAGEBLOCK_ORDER, ge=0, le=18)
    # PAGE_REPORTING_DELAY = 2 * HZ: a request starts the pass this much later.
    delay_ns: int = Field(2_000_000_000, ge=1, le=DAY_NS)
    # PAGE_REPORTING_CAPACITY: blocks per prdev->report() call (one virtqueue request).
    capacity: int = Field(32, ge=1, le=4096)
    # The budget's divisor: a pass makes at most ceil(nr_free / (capacity * 16)) + 1 calls
    # on a free list ("a sixteenth of the current list plus one").
    budget_divisor: int = Field(16, ge=1, le=1 << 20)


class GuestConfig(_LaterKeys):
    _later: ClassVar[tuple[str, ...]] = ("free_page_reporting", "page_reporting")
    # The guest's architecture where the protocol has none of its own (sync): its exception
    # entry code and return-path preemption. A protocol of an arch always runs on that arch.
    arch: Literal["arm64", "x86", "s390"] = "arm64"
    vcpus: int = Field(1, ge=1, le=256)
    memory_mib: int = Field(4096, ge=16, le=MAX_MEMORY_MIB)
    reserved_mib: int = Field(256, ge=0, le=MAX_MEMORY_MIB)
    hz: int = Field(250, ge=10, le=10_000)
    preempt: Literal["full", "voluntary"] = "full"
    steal_time_accounting: bool = False
    no_kvmapf: bool = False
    send_always: bool = False
    preempt_count_config: bool = True
    handler_offsets_max: int = Field(0x1000, ge=0, le=MAX_OFFSET)
    vector_pc_offset: int = Field(0x200, ge=0, le=MAX_OFFSET)
    kernel_entry_pc_offset: int = Field(0xC00, ge=0, le=MAX_OFFSET)
    dummy_alloc_fail_probability: float = Field(0.0, ge=0.0, lt=1.0)
    sched: SchedConfig = SchedConfig()
    costs: GuestCosts = GuestCosts()
    # virtio-balloon free page reporting (VIRTIO_BALLOON_F_REPORTING): freed 2 MiB blocks are
    # reported to the host, which discards them (docs/model.md).
    free_page_reporting: bool = False
    # Its tunables; inert while free_page_reporting is off (as a sweep axis may leave them).
    page_reporting: PageReportingConfig = PageReportingConfig()


class SwapConfig(_Model):
    """Swap device: service time per request and how many are served at once."""

    distribution: Literal["lognormal", "exponential", "constant"] = "lognormal"
    # Service times from 1 ns (the engine's resolution) to a day.
    mean_us: float = Field(1680.0, ge=0.001, le=DAY_US)
    min_us: float = Field(36.2, ge=0.001, le=DAY_US)
    max_us: float = Field(55_700.0, ge=0.001, le=DAY_US)
    fit_samples: int = Field(7555, ge=2, le=10**9)
    write_mean_scale: float = Field(1.0, ge=0.001, le=1000.0)
    queue_depth: int = Field(32, ge=1, le=4096)
    transfer_ns_per_page: Ns = 4_000
    # swapin_readahead: "auto" = swap_use_vma_readahead() (VMA-based unless a rotating swap
    # device is active, Linux >= 4.14); "vma" / "cluster" force one (vma_ra_enabled).
    readahead: Literal["auto", "vma", "cluster"] = "auto"
    rotational: bool = True  # the RFCv2 testbed's SAS disk: nr_rotate_swap > 0

    def readahead_mode(self) -> Literal["vma", "cluster"]:
        """The readahead ``swapin_readahead`` uses on this device."""
        if self.readahead == "auto":
            return "cluster" if self.rotational else "vma"
        return self.readahead

    @model_validator(mode="after")
    def _ordered(self) -> SwapConfig:
        if self.distribution != "lognormal":
            return self
        if not self.min_us < self.mean_us < self.max_us:
            raise ValueError("need min_us < mean_us < max_us for the lognormal fit")
        # host.backing.fit_lognormal's sigma; its median mean / exp(sigma**2 / 2) must stay
        # at least 1 ns, or the fit under- and overflows.
        z = NormalDist().inv_cdf(1 - 1 / (self.fit_samples + 1))
        sigma = math.log(self.max_us / self.min_us) / (2 * z)
        if sigma**2 / 2 > math.log(self.mean_us * 1000.0):
            raise ValueError(
                f"max_us / min_us = {self.max_us / self.min_us:.3g} is too wide for mean_us "
                f"{self.mean_us:g}: the lognormal fit's median is under 1 ns; narrow it"
            )
        return self


class HostCosts(_Model):
    """Host CPU time per protocol operation in ns, on top of the exit and entry themselves.

    Each key left unset takes the figure of ``preset`` (apfsim.host.costs; sources in
    docs/model.md "Per-arch cost presets"); ``auto`` is the preset of the run's arch."""

    preset: PresetName = "auto"
    exception_inject_ns: Ns | None = None  # kvm_inject_dabt / kvm_inject_page_fault
    interrupt_inject_ns: Ns | None = None  # a vGIC list register / APIC IRR bit
    sdei_deliver_ns: Ns | None = None  # save the interrupted context, enter the handler
    sdei_complete_ns: Ns | None = None  # SDEI_EVENT_COMPLETE: restore that context
    hypercall_ns: Ns | None = None  # an HVC / VMCALL / PV-MSR write's dispatch
    ack_exit_ns: Ns | None = None  # the page-ready ACK and its completion re-check
    ipi_send_ns: Ns | None = None  # the sender's trapped ICR / ICC_SGI1R_EL1 write


class BalloonConfig(_Model):
    """QEMU's virtio-balloon report queue (``virtio_balloon_handle_report``): host time per
    report (assumptions, see docs/model.md)."""

    # Per reported range: the element's RAMBlock lookup and one ram_block_discard_range
    # (madvise(MADV_DONTNEED)) system call.
    report_range_ns: Ns = 2_000
    # Per page the zap finds populated (resident, or a swap entry): clear the PTE, free the
    # page or the swap entry, uncharge the memcg.
    discard_page_ns: Ns = 100


class HostConfig(_LaterKeys):
    _later: ClassVar[tuple[str, ...]] = (
        "cpus",
        "pin_vcpus",
        "worker_finish_ns",
        "sched",
        "balloon",
    )

    # Host CPUs the VM's threads (vCPU threads, async PF kworkers) share; 0: one per
    # runnable thread, so nothing ever waits for a CPU (host/sched.py).
    cpus: int = Field(0, ge=0, le=256)
    pin_vcpus: bool = False  # vCPU i runs only on host CPU i mod cpus
    # The kworker's CPU time after the swap-in I/O (PTE install, completion).
    worker_finish_ns: Ns = 0
    sched: SchedConfig = SchedConfig()  # the host's CFS tunables (used when cpus > 0)
    memory_limit_mib: int = Field(2048, ge=1, le=MAX_MEMORY_MIB)
    tick_hz: int = Field(250, ge=0, le=10_000)  # host scheduler tick: an exit while in guest
    page_cluster: int = Field(3, ge=0, le=6)
    reclaim_batch: int = Field(32, ge=1, le=MAX_MEMORY_MIB * MIB_PAGES)
    exit_ns: Ns | None = None  # unset: from host.costs.preset
    entry_ns: Ns | None = None
    stage2_fault_ns: Ns = 2_000
    zero_fill_ns: Ns = 1_500
    minor_fault_ns: Ns = 1_000
    worker_start_ns: Ns = 10_000
    no_fault_inst_range: int = Field(0x800, ge=0, le=MAX_OFFSET)
    costs: HostCosts = HostCosts()
    swap: SwapConfig = SwapConfig()
    balloon: BalloonConfig = BalloonConfig()


class InitialMemory(_LaterKeys):
    """Host state of guest memory at t=0: the rest of the pages are never touched."""

    _later: ClassVar[tuple[str, ...]] = ("reported",)
    resident_fraction: float = Field(0.1, ge=0.0, le=1.0)
    swapped_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # With guest.free_page_reporting: were the blocks free at t=0 reported before (the guest
    # has been up more than the ~30 s a full report takes)? unset: true. They then start
    # discarded (UNTOUCHED); false: the reporting device has just registered.
    reported: bool | None = None

    @model_validator(mode="after")
    def _sum(self) -> InitialMemory:
        if self.resident_fraction + self.swapped_fraction > 1.0:
            raise ValueError("resident_fraction + swapped_fraction must be at most 1")
        return self


Mode = Literal["user", "kernel", "kernel_atomic", "kernel_rcu", "kernel_irqs_off"]


class _TaskBase(_Model):
    """Keys every task entry has: ``count`` threads, optionally pinned to one ``cpu``."""

    count: int = Field(1, ge=1, le=256)
    cpu: int | None = Field(None, ge=0, le=255)

    def claimed_mib(self) -> int:
        """Guest memory this entry claims (shared by its ``count`` threads)."""
        return 0


class ComputeSpec(_TaskBase):
    kind: Literal["compute"]
    name: str = "compute"
    work_s: float | None = Field(None, ge=1e-9, le=MAX_DURATION_S)


class RandomWriterSpec(_TaskBase):
    kind: Literal["random_writer"]
    name: str = "writer"
    buffer_mib: int = Field(1024, ge=1, le=MAX_MEMORY_MIB)
    access_ns: int = Field(200, ge=1, le=DAY_NS)
    kernel_fraction: float = Field(0.0, ge=0.0, le=1.0)
    kernel_mode: Mode = "kernel"

    def claimed_mib(self) -> int:
        return self.buffer_mib


class MemoryHogSpec(_TaskBase):
    kind: Literal["memory_hog"]
    name: str = "memhog"
    count: int = Field(1, ge=1, le=1)
    # unset: all memory the other tasks leave
    memory_mib: int | None = Field(None, ge=1, le=MAX_MEMORY_MIB)
    passes: int = Field(2, ge=1, le=10**9)
    iterations: int | None = Field(None, ge=1, le=10**9)  # unset: repeat for the whole run
    page_write_ns: int = Field(600, ge=1, le=DAY_NS)

    def claimed_mib(self) -> int:
        return self.memory_mib or 0


class FaultLoopSpec(_TaskBase):
    """Exponential compute bursts, each followed by a fault on the next page of a region."""

    kind: Literal["fault_loop"]
    name: str = "faulter"
    region_mib: int = Field(64, ge=1, le=MAX_MEMORY_MIB)
    # At least 1 µs: shorter bursts are a fault per few instructions and millions of events
    # per simulated 50 ms; at most a day.
    burst_mean_us: float = Field(1000.0, ge=1.0, le=DAY_US)

    def claimed_mib(self) -> int:
        return self.region_mib * self.count


TaskSpec = Annotated[
    ComputeSpec | RandomWriterSpec | MemoryHogSpec | FaultLoopSpec, Field(discriminator="kind")
]


class PostcopyConfig(_Model):
    """Postcopy live migration's destination (``apfsim.host.postcopy``); off by default.

    The run starts at the switch-over's RUN with every page on the source, or, with
    ``precopy_rounds``, at the migration's start with the guest on the source. Defaults are the
    QEMU and Linux defaults where there is one; the rest are stated assumptions
    (docs/model.md, "Postcopy").
    """

    enabled: bool = False
    source: Literal["network", "local"] = "network"
    page_size: Literal["4k", "2m", "1g"] = "4k"
    link_gbps: float = Field(10.0, ge=0.001, le=10_000.0)
    rtt_us: float = Field(100.0, ge=0.0, le=DAY_US)
    preempt: bool = False  # QEMU's postcopy-preempt capability (off by default)
    background: bool = True  # the source streams the pages not yet sent
    socket_buffer_kib: int = Field(4096, ge=4, le=1 << 20)  # net.ipv4.tcp_wmem max
    receive_buffer_kib: int = Field(6144, ge=4, le=1 << 20)  # net.ipv4.tcp_rmem max
    qemufile_buffer_kib: int = Field(32, ge=0, le=1 << 20)  # QEMUFile IO_BUF_SIZE
    frame_kib: int = Field(64, ge=4, le=1 << 20)  # the 64 KiB GSO/TSO segment
    uffds: Literal["one", "per-vcpu"] = "one"
    uffd_lock_ns: Ns = 100
    wake_entry_ns: Ns = 20
    fault_read_ns: Ns = 2_000
    request_send_ns: Ns = 2_000
    source_request_ns: Ns = 5_000
    uffdio_copy_ns: Ns = 1_000
    copy_gbytes_per_s: float = Field(10.0, ge=0.01, le=10_000.0)
    zeropage_ns: Ns = 500
    wakeup_ns: Ns = 5_000
    local_delay_us: float = Field(0.0, ge=0.0, le=DAY_US)
    exit_to_user_ns: Ns = 3_000
    device_state_kib: int = Field(1024, ge=0, le=1 << 30)
    # Precopy rounds before the switch-over (0: the run starts at the switch-over).
    precopy_rounds: int = Field(0, ge=0, le=100)


class Scenario(_LaterKeys):
    """One VM under one host: the unit apfsim runs under each protocol."""

    _later: ClassVar[tuple[str, ...]] = ("postcopy",)

    name: str = "custom"
    description: str = ""
    duration_s: float = Field(10.0, gt=0, le=MAX_DURATION_S)
    stop_when_done: bool = True
    guest: GuestConfig = GuestConfig()
    host: HostConfig = HostConfig()
    initial_memory: InitialMemory = InitialMemory()
    tasks: list[TaskSpec] = Field(min_length=1, max_length=256)
    postcopy: PostcopyConfig = PostcopyConfig()

    @model_validator(mode="after")
    def _fits(self) -> Scenario:
        g = self.guest
        pc = self.postcopy
        if pc.enabled:
            if self.host.memory_limit_mib < g.memory_mib:
                raise ValueError(
                    f"host.memory_limit_mib: postcopy's destination holds the whole guest; "
                    f"set it to guest.memory_mib ({g.memory_mib})"
                )
            huge = {"4k": 0, "2m": 2, "1g": 1024}[pc.page_size]
            if huge and g.memory_mib % huge:
                raise ValueError(
                    f"postcopy.page_size: guest.memory_mib ({g.memory_mib}) is not a whole "
                    f"number of {pc.page_size} host pages; use a multiple of {huge} MiB"
                )
            if pc.precopy_rounds and pc.source != "network":
                raise ValueError(
                    "postcopy.precopy_rounds: precopy needs a migration stream; set "
                    "postcopy.source = 'network' or precopy_rounds = 0"
                )
            if pc.precopy_rounds and self.initial_memory.swapped_fraction:
                raise ValueError(
                    "initial_memory.swapped_fraction: with postcopy.precopy_rounds the guest "
                    "starts on a source host with its memory resident; set it to 0"
                )
            if pc.uffds == "per-vcpu" and pc.source != "local":
                raise ValueError(
                    "postcopy.uffds: QEMU registers all guest RAM in one uffd; 'per-vcpu' "
                    "needs postcopy.source = 'local' (the demand-paging selftest)"
                )
        if self.host.pin_vcpus and self.host.cpus == 0:
            raise ValueError(
                "host.pin_vcpus: pinning needs a number of host CPUs; set host.cpus (> 0) "
                "or drop pin_vcpus"
            )
        if self.host.cpus and not self.host.tick_hz:
            raise ValueError(
                "host.cpus: shared host CPUs need the host's tick to preempt (check_preempt_tick); "
                "set host.tick_hz > 0 or host.cpus = 0"
            )
        if self.host.memory_limit_mib > g.memory_mib:
            raise ValueError(
                f"host.memory_limit_mib: {self.host.memory_limit_mib} MiB is more than "
                f"guest.memory_mib ({g.memory_mib}); a limit above the guest never reclaims, "
                f"give at most {g.memory_mib}"
            )
        fixed = sum(t.claimed_mib() for t in self.tasks)
        if g.reserved_mib + fixed > g.memory_mib:
            raise ValueError(
                f"tasks: buffers need {fixed} MiB + reserved {g.reserved_mib} MiB but "
                f"guest.memory_mib is {g.memory_mib}"
            )
        # A memory_hog without memory_mib takes what the others leave: there must be some,
        # and only one such hog can take it.
        sizeless = [i for i, t in enumerate(self.tasks) if isinstance(t, MemoryHogSpec)]
        sizeless = [i for i in sizeless if self.tasks[i].claimed_mib() == 0]
        if len(sizeless) > 1:
            raise ValueError(
                f"tasks.{sizeless[1]}: a second memory_hog without memory_mib; give every "
                "memory_hog but one its memory_mib"
            )
        if sizeless and g.reserved_mib + fixed == g.memory_mib:
            raise ValueError(
                f"tasks.{sizeless[0]}: the memory_hog without memory_mib would get the 0 MiB "
                f"the other tasks and reserved_mib leave of guest.memory_mib ({g.memory_mib}); "
                "give it memory_mib or free some memory"
            )
        for t in self.tasks:
            if t.cpu is not None and t.cpu >= g.vcpus:
                raise ValueError(
                    f"tasks: cpu {t.cpu} of {t.name!r} must be < guest.vcpus ({g.vcpus})"
                )
        if self.initial_memory.reported is not None and not g.free_page_reporting:
            raise ValueError(
                "initial_memory.reported needs guest.free_page_reporting = true; "
                "set it or remove initial_memory.reported"
            )
        resident_pages = self.initial_memory.resident_fraction * g.memory_mib
        if resident_pages > self.host.memory_limit_mib:
            raise ValueError(
                "initial_memory.resident_fraction: resident pages would exceed "
                "host.memory_limit_mib; lower it"
            )
        return self


_SHOW = reprlib.Repr()  # a bad value as the error shows it: long ones cut short
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlong = 40


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped: one printable line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short_repr(value: Any) -> str:
    """``repr(value)`` for an error message: on one line, long values cut short."""
    return one_line(_SHOW.repr(value))


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` naming the choice closest to ``name`` (difflib), or ``""``."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {short_repr(close[0])}?" if close else ""


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation may hold (through unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType, list, tuple, dict, Annotated):
        return [m for arg in get_args(annotation) for m in _models(arg)]
    return []


def _keys_at(loc: tuple[int | str, ...]) -> set[str]:
    """The keys a scenario table at ``loc`` allows (a list index or union tag is passed over)."""
    models: list[type[BaseModel]] = [Scenario]
    for part in loc:
        inner = [
            m
            for model in models
            if isinstance(part, str) and part in model.model_fields
            for m in _models(model.model_fields[part].annotation)
        ]
        models = inner or models
    return {name for model in models for name in model.model_fields}


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {short_repr(value)})"
    hint = ""
    if first["type"] == "extra_forbidden":
        *parents, key = first["loc"]
        hint = "; remove it or check the spelling (`apfsim show` prints every valid key)"
        hint += did_you_mean(key, _keys_at(tuple(parents)))
    elif first["type"] == "literal_error":
        hint = did_you_mean(
            value, re.findall(r"'([^']*)'", str(first.get("ctx", {}).get("expected", "")))
        )
    elif first["type"] == "missing":
        hint = "; add it (`apfsim show rfcv2-2020` prints a complete example)"
    where = f"{loc}: " if loc else ""
    return one_line(f"{source}: {where}{msg}{shown}{hint}")


def scenario_from_dict(data: dict[str, Any], source: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(_format_error(err, source)) from None


def set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of the scenario dict ``data`` with the existing key ``dotted``
    (``host.swap.mean_us``, ``tasks.0.count``) set to ``value``; only the tables on the path
    are copied. A path that is not a key of ``data`` raises :class:`ScenarioError`."""
    *parents, leaf = dotted.split(".")
    top: dict[str, Any] = dict(data)
    node: Any = top
    found: list[str] = []  # the parts of the path found so far
    try:
        for key in parents:
            if isinstance(node, list):
                # A list index is plain digits: no sign ("-1"), no "_", no spaces.
                if not (key.isascii() and key.isdigit()):
                    raise KeyError(key)
                index = int(key)
                node[index] = child = _copy(node[index])
            elif isinstance(node, dict):
                node[key] = child = _copy(node[key])
            else:
                raise KeyError(key)
            node = child
            found.append(key)
        if not isinstance(node, dict) or leaf not in node:
            raise KeyError(leaf)
    except (KeyError, IndexError):
        hint = ""
        if isinstance(node, dict):
            bad, *rest = dotted.split(".")[len(found) :]
            close = difflib.get_close_matches(bad, [str(k) for k in node], n=1)
            if close:
                hint = f"; did you mean {'.'.join([*found, close[0], *rest])!r}?"
        raise ScenarioError(
            one_line(f"{dotted}: no such scenario key; `apfsim show` prints every valid key{hint}")
        ) from None
    node[leaf] = value
    return top


def _copy(node: Any) -> Any:
    """A shallow copy of a table or list; anything else as it is."""
    if isinstance(node, dict):
        return dict(node)
    if isinstance(node, list):
        return list(node)
    return node


def with_overrides(scenario: Scenario, overrides: Mapping[str, Any]) -> Scenario:
    """``scenario`` with dotted keys replaced (``host.swap.mean_us``, ``tasks.0.count``),
    validated again; a bad key or value raises :class:`ScenarioError` naming it."""
    data = scenario.model_dump(mode="python")
    for dotted, value in overrides.items():
        data = set_path(data, dotted, value)
    return scenario_from_dict(data, "override")


def builtin_scenarios() -> dict[str, str]:
    """Built-in scenario names mapped to their one-line descriptions."""
    out: dict[str, str] = {}
    for entry in sorted(resources.files("apfsim.scenarios").iterdir(), key=lambda p: p.name[:-5]):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text())
            out[entry.name[:-5]] = str(data.get("description", ""))
    return out


BUILTIN_SCENARIOS = builtin_scenarios


def _builtin_names() -> set[str]:
    return {
        e.name[:-5]
        for e in resources.files("apfsim.scenarios").iterdir()
        if e.name.endswith(".toml")
    }


def parse_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads``, with what the parser raises besides a syntax error (nesting too
    deep for its recursion, an integer of over 4300 digits) raised as one too."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise
    except RecursionError:
        raise tomllib.TOMLDecodeError("arrays or tables nested too deeply") from None
    except ValueError as err:
        raise tomllib.TOMLDecodeError(str(err)) from None


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a built-in scenario by name, or a TOML file by path."""
    source = one_line(str(name_or_path))
    if str(name_or_path) in _builtin_names():
        text = (resources.files("apfsim.scenarios") / f"{name_or_path}.toml").read_text()
    else:
        try:
            text = Path(name_or_path).read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            known = ", ".join(builtin_scenarios())
            hint = did_you_mean(str(name_or_path), _builtin_names())
            raise ScenarioError(
                f"{source}: no such built-in scenario or file; built-ins are: {known}{hint}"
            ) from None
        except (OSError, ValueError) as err:  # ValueError: not UTF-8, a NUL in the name
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise ScenarioError(f"{source}: cannot read the file ({reason})") from None
    try:
        data = parse_toml(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{source}: not valid TOML ({err})") from None
    return scenario_from_dict(data, source)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A TOML basic string: JSON's escapes are TOML's, and TOML escapes DEL too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"cannot write {value!r} as TOML")


def scenario_to_toml(scenario: Scenario) -> str:
    """The fully resolved scenario as TOML (every default written out)."""
    data = scenario.model_dump(mode="python")
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        subtables = []
        for key, value in table.items():
            if isinstance(value, dict):
                subtables.append((f"{prefix}.{key}" if prefix else key, value))
            elif isinstance(value, list):
                continue
            elif value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        for name, sub in subtables:
            lines.append("")
            lines.append(f"[{name}]")
            emit(name, sub)

    emit("", data)
    for task in data["tasks"]:
        lines.append("")
        lines.append("[[tasks]]")
        for key, value in task.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
