"""``apfsim``: a thin command line over :mod:`apfsim.api`.

Errors in input (scenario files, flags) print one line naming the field and exit 2; no
traceback is shown. Results already computed are printed before any late error.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from apfsim.api import (
    DEFAULT_PROTOCOLS,
    DEFAULT_SEEDS,
    MAX_DURATION_S,
    CompareResult,
    Interrupted,
    compare,
    compare_summary_table,
    compare_table,
    run,
)
from apfsim.check import WorldConfig, check
from apfsim.check.mutants import MUTANTS
from apfsim.check.report import mutants_text, result_dict, result_text, world_line
from apfsim.check.search import CheckResult
from apfsim.check.world import MODES, has_lifecycle
from apfsim.metrics.notes import no_injection_note
from apfsim.metrics.results import RunResult
from apfsim.registry import PROTOCOLS
from apfsim.scenario import (
    DEFAULT_SCENARIO,
    ScenarioError,
    builtin_scenarios,
    load_scenario,
    one_line,
    scenario_to_toml,
)
from apfsim.simulation import InvariantViolation
from apfsim.sweep.run import EXECUTORS, WORKER_TIMEOUT_S, run_sweep
from apfsim.sweep.run import SweepError as SweepRunError
from apfsim.sweep.spec import SweepError as SpecError
from apfsim.sweep.spec import builtin_sweeps, load_sweep
from apfsim.sweep.store import SweepStore
from apfsim.trace import TraceOptions, read_trace
from apfsim.trace.formats import KERNEL_DEFAULT, parse_kernel
from apfsim.trace.output import TraceWriteError, check_output
from apfsim.trace.stats import trace_stats_text
from apfsim.version import __version__

__all__ = ["app", "cli", "main"]

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Simulate KVM asynchronous page faults and compare protocol designs.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(f"apfsim {__version__}")
        raise typer.Exit(0)


@app.callback()
def _app_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Simulate KVM asynchronous page faults and compare protocol designs."""


_PROGRESS_AFTER_S = 2.0
_LINE_EVERY_S = 10.0  # off a terminal: one progress line this often

DurationOption = Annotated[
    float | None, typer.Option(help="Simulated seconds (overrides the scenario).")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No table, no progress.")]
NoCheckOption = Annotated[
    bool, typer.Option("--no-check", help="Do not check protocol invariants as it runs.")
]
TraceOption = Annotated[
    Path | None,
    typer.Option(
        "--trace",
        help="Write a Chrome trace-event JSON timeline (ui.perfetto.dev) to this file; "
        "with several runs, one file each, tagged with protocol (and seed).",
    ),
]
FtraceOption = Annotated[
    Path | None,
    typer.Option(
        "--ftrace",
        help="Write the run as kernel tracepoints in trace-cmd report layout to this file.",
    ),
]
FtraceNsOption = Annotated[
    bool,
    typer.Option("--ftrace-ns", help="--ftrace timestamps in ns, as trace-cmd report -t (not µs)."),
]
FtraceKernelOption = Annotated[
    str | None,
    typer.Option(
        "--ftrace-kernel",
        help="The kernel version whose x86 kvm_entry/kvm_exit layout --ftrace writes "
        "(5.10 or later; default 6.18).",
    ),
]
TraceWindowOption = Annotated[
    str | None,
    typer.Option(
        "--trace-window",
        help="Trace only simulated seconds START:END (either side may be empty).",
    ),
]


def _seconds_text(seconds: float) -> str:
    """``42 s`` or ``3 min 05 s``: elapsed times and ETAs in progress lines."""
    whole = max(0, round(seconds))
    return f"{whole} s" if whole < 60 else f"{whole // 60} min {whole % 60:02d} s"


class _Progress:
    """Progress with elapsed time and ETA on stderr, shown once the work has taken ~2 s: a
    rich bar updated in place on a terminal, one bar per key; off a terminal (CI logs) a
    plain line every 10 s instead. ``quiet`` silences it."""

    def __init__(self, quiet: bool, protocols: list[str] | None = None) -> None:
        self.quiet = quiet
        self.protocols = protocols or []
        self.console = Console(stderr=True)
        self.start = time.monotonic()
        self.bar: Progress | None = None
        self.task_ids: dict[str, Any] = {}
        self.last_line = self.start
        self.sweep_first: tuple[float, int] | None = None

    def _timing(self, fraction: float) -> str:
        """``12 s elapsed, ETA 30 s`` from the fraction done so far."""
        elapsed = time.monotonic() - self.start
        eta = _seconds_text(elapsed * (1 - fraction) / fraction) if fraction > 0 else "-"
        return f"{_seconds_text(elapsed)} elapsed, ETA {eta}"

    def show(self, key: str, completed: float, total: float, line: str, detail: str = "") -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if now - self.start < _PROGRESS_AFTER_S:
            return
        if not self.console.is_terminal:
            if now - self.last_line >= _LINE_EVERY_S:
                self.last_line = now
                print(f"apfsim: {line}", file=sys.stderr)
            return
        if self.bar is None:
            self.bar = Progress(
                TextColumn("{task.description:>16}"),
                TextColumn("{task.fields[detail]}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()
        if key not in self.task_ids:
            self.task_ids[key] = self.bar.add_task(key, total=total, detail="")
        self.bar.update(self.task_ids[key], completed=completed, detail=detail)

    def protocol_fraction(self, protocol: str, fraction: float) -> None:
        """For ``run``: one bar over the protocols, each taking its share, in simulated
        time."""
        n = len(self.protocols) or 1
        i = self.protocols.index(protocol) if protocol in self.protocols else 0
        overall = (i + fraction) / n
        detail = f"{protocol} ({i + 1}/{n})"
        line = f"run: {overall:.0%} ({detail}), {self._timing(overall)}"
        self.show("run", overall, 1.0, line, detail)

    def runs_done(self, completed: float, total: int) -> None:
        """For ``compare``: one bar of finished runs out of the total."""
        detail = f"{int(completed)}/{total} runs"
        self.show(
            "compare",
            completed,
            total,
            f"compare: {detail}, {self._timing(completed / total)}",
            detail,
        )

    def sweep_done(self, completed: int, total: int) -> None:
        """For ``sweep``: runs done (stored earlier ones included) of the total, the rate of
        this invocation and its ETA."""
        if self.sweep_first is None:
            self.sweep_first = (time.monotonic(), completed)
        t0, c0 = self.sweep_first
        elapsed = time.monotonic() - t0
        rate = (completed - c0) / elapsed if elapsed > 0 else 0.0
        eta = _seconds_text((total - completed) / rate) if rate > 0 else "-"
        detail = f"{completed}/{total} runs, {rate:.2f} runs/s"
        line = f"sweep: {detail}, {_seconds_text(elapsed)} elapsed, ETA {eta}"
        self.show("sweep", completed, total, line, detail)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _split_protocols(values: list[str]) -> list[str]:
    """``-p a,b -p c`` -> ``[a, b, c]``; an empty item is an error."""
    names = []
    for value in values:
        for name in value.split(","):
            if not name.strip():
                raise _fail(
                    f"--protocol: empty name in {value!r}; give comma-separated names from "
                    f"{', '.join(PROTOCOLS)}"
                )
            names.append(name.strip())
    return names


def _fail(message: str) -> typer.Exit:
    print(f"apfsim: error: {one_line(message)}", file=sys.stderr)
    return typer.Exit(2)


class _Exit(Exception):
    """Leave with ``code``: the command has printed all it had to. (A KeyboardInterrupt or
    typer.Exit(130) would reach :func:`main` as a bare 130, read as an unhandled ^C.)"""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, False where the path cannot even be looked up (a name too long)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _check_duration_flag(duration: float | None) -> None:
    if duration is not None and not 0 < duration <= MAX_DURATION_S:
        raise _fail(
            f"--duration: must be a number of seconds in (0, {MAX_DURATION_S:g}] (got {duration})"
        )


def _check_json_path(json_path: Path | None) -> None:
    """Fail before running, not after: results must not be lost to a bad --json path."""
    if json_path is not None and not _is_dir(json_path.parent):
        raise _fail(f"--json: directory {str(json_path.parent)!r} does not exist; create it first")


def _trace_options(
    trace: Path | None,
    ftrace: Path | None,
    window: str | None,
    ftrace_ns: bool = False,
    ftrace_kernel: str | None = None,
) -> TraceOptions | None:
    """Check the tracing flags before running: a bad path or window fails at once."""
    for flag, path in (("--trace", trace), ("--ftrace", ftrace)):
        if path is not None and not _is_dir(path.parent):
            raise _fail(
                f"{flag}: directory {str(path.parent)!r} does not exist or cannot be looked up "
                "(a name too long?); give an existing directory"
            )
    if ftrace is None and (ftrace_ns or ftrace_kernel is not None):
        raise _fail(f"{'--ftrace-ns' if ftrace_ns else '--ftrace-kernel'}: give --ftrace too")
    kernel = KERNEL_DEFAULT
    if ftrace_kernel is not None:
        try:
            kernel = parse_kernel(ftrace_kernel)
        except ValueError as err:
            raise _fail(f"--ftrace-kernel: {err}") from None
    if trace is None and ftrace is None:
        if window is not None:
            raise _fail("--trace-window: give --trace or --ftrace too")
        return None
    span = (0, 1 << 62)
    if window is not None:
        start_text, sep, end_text = window.partition(":")
        try:
            if not sep:
                raise ValueError
            start = float(start_text) if start_text.strip() else 0.0
            end = float(end_text) if end_text.strip() else None
        except ValueError:
            raise _fail(
                f"--trace-window: expected START:END in simulated seconds, like 30:31 or 30: "
                f"(got {window!r})"
            ) from None
        finite = math.isfinite(start) and (end is None or math.isfinite(end))
        if not finite or start > MAX_DURATION_S or start < 0 or (end is not None and end <= start):
            raise _fail(f"--trace-window: need 0 <= START < END (got {window!r})")
        span = (round(start * 1e9), (1 << 62) if end is None else round(end * 1e9))
    return TraceOptions(trace, ftrace, span, ftrace_ns, kernel)


def _check_trace_outputs(tracing: TraceOptions | None, runs: list[TraceOptions]) -> None:
    """Before the first run: every file the runs will write can be written (so no run dies
    half way on /dev/full, a directory or a read-only file system), and the flags name files,
    not special ones, even when each run tags its own file name."""
    if tracing is None:
        return
    if tracing.chrome is not None and tracing.chrome == tracing.ftrace:
        raise _fail("--ftrace: the same file as --trace; give two files")
    try:
        for flag, path in (("--trace", tracing.chrome), ("--ftrace", tracing.ftrace)):
            if path is not None:
                check_output(path, flag, probe=False)
        for options in runs:
            for flag, path in (("--trace", options.chrome), ("--ftrace", options.ftrace)):
                if path is not None:
                    check_output(path, flag)
    except TraceWriteError as err:
        raise _fail(str(err)) from None


def _check_window(tracing: TraceOptions | None, duration_s: float) -> None:
    """A --trace-window starting at or after the run's end would write an empty trace."""
    if tracing is None:
        return
    start_s = tracing.window[0] / 1e9
    if start_s >= duration_s:
        raise _fail(
            f"--trace-window: starts at {start_s:g} s but the run lasts {duration_s:g} s "
            f"(--duration or the scenario's duration_s); give a window within 0:{duration_s:g}"
        )


def _write_json(json_path: Path, data: dict[str, Any]) -> None:
    """Sorted keys, two-space indent: the same run gives the same bytes."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        json_path.write_text(text)
    except OSError as err:
        raise _fail(f"--json: cannot write {str(json_path)!r} ({err.strerror})") from None


@app.command("run")
def run_command(
    scenario: Annotated[
        str, typer.Argument(help="Built-in scenario name or path to a TOML file.")
    ] = DEFAULT_SCENARIO,
    protocol: Annotated[
        list[str] | None,
        typer.Option(
            "--protocol",
            "-p",
            help="Protocols, comma-separated (the flag may repeat; see apfsim protocols). "
            "Default: sync and arm64-rfcv2.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same results).")] = 0,
    duration: DurationOption = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON to this file.")
    ] = None,
    quiet: QuietOption = False,
    no_check: NoCheckOption = False,
    trace: TraceOption = None,
    ftrace: FtraceOption = None,
    trace_window: TraceWindowOption = None,
    ftrace_ns: FtraceNsOption = False,
    ftrace_kernel: FtraceKernelOption = None,
) -> None:
    """Run a scenario under protocols on one seed and print the comparison."""
    protocols = _split_protocols(protocol) if protocol else list(DEFAULT_PROTOCOLS)
    for name in protocols:
        if name not in PROTOCOLS:
            raise _fail(
                f"--protocol: unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}"
            )
    if len(set(protocols)) != len(protocols):
        raise _fail("--protocol: each protocol may be given once")
    if seed < 0:
        raise _fail(f"--seed: must be a non-negative integer (got {seed})")
    _check_duration_flag(duration)
    _check_json_path(json_path)
    tracing = _trace_options(trace, ftrace, trace_window, ftrace_ns, ftrace_kernel)
    try:
        sc = load_scenario(scenario)
    except ScenarioError as err:
        raise _fail(str(err)) from None
    _check_window(tracing, duration if duration is not None else sc.duration_s)
    if tracing is not None:
        tagged = [tracing] if len(protocols) == 1 else [tracing.for_run(p) for p in protocols]
        _check_trace_outputs(tracing, tagged)
    progress = _Progress(quiet, protocols)
    with _keeping_what_finished(progress, lambda p: _keep_partial_run(p, quiet, json_path)):
        result = run(
            sc,
            protocols,
            seed=seed,
            duration_s=duration,
            progress=progress.protocol_fraction,
            check=not no_check,
            trace=tracing,
        )
    if not quiet:
        print(compare_table(result))
        for r in result.results:
            _note(no_injection_note([r], result.scenario))
    if json_path is not None:
        _write_json(json_path, result.to_dict())


def _note(note: str | None) -> None:
    """A one-line note on stderr (after the table), if there is one."""
    if note is not None:
        print(f"apfsim: note: {note}", file=sys.stderr)


@contextlib.contextmanager
def _keeping_what_finished(progress: _Progress, keep: Callable[[Any], str]) -> Iterator[None]:
    """Around a command's runs: cut short by an invariant, a failed trace write or ^C, what
    finished is printed and written by ``keep(partial)`` before the one-line exit."""
    try:
        yield
    except InvariantViolation as err:
        progress.close()
        keep(err.partial)
        print(f"apfsim: invariant violated: {err}", file=sys.stderr)
        raise typer.Exit(1) from None
    except TraceWriteError as err:
        progress.close()
        keep(err.partial)
        raise _fail(str(err)) from None
    except Interrupted as err:
        progress.close()
        print(f"apfsim: interrupted: {keep(err.partial)}", file=sys.stderr)
        raise _Exit(130) from None
    finally:
        progress.close()


def _keep_partial_run(partial: RunResult | None, quiet: bool, json_path: Path | None) -> str:
    """Print and write the protocols that finished before a run was cut short; says what
    was kept."""
    if partial is None or not partial.results:
        return "no protocol had finished; nothing to keep"
    if not quiet:
        print(compare_table(partial))
    names = ", ".join(r.protocol for r in partial.results)
    kept = f"kept what finished ({names})"
    if json_path is not None:
        _write_json(json_path, partial.to_dict())
        kept += f", written to {str(json_path)!r} marked partial"
    return kept


def _keep_partial_compare(
    partial: CompareResult | None, quiet: bool, json_path: Path | None
) -> str:
    """Print and write the runs that finished before a comparison was cut short; says what
    was kept."""
    if partial is None or not partial.runs:
        return "no run had finished; nothing to keep"
    if not quiet:
        print(compare_summary_table(partial))
    total = len(partial.protocols) * len(partial.seeds)
    kept = f"kept the {len(partial.runs)} of {total} runs that finished"
    if json_path is not None:
        _write_json(json_path, partial.to_dict())
        kept += f", written to {str(json_path)!r} marked partial"
    return kept


@app.command("compare")
def compare_command(
    scenario: Annotated[str, typer.Argument(help="Built-in scenario name or path to a TOML file.")],
    protocol: Annotated[
        list[str] | None,
        typer.Option(
            "--protocol",
            "-p",
            help="Protocols, comma-separated (the flag may repeat; see apfsim protocols). "
            "Default: all of them.",
        ),
    ] = None,
    baseline: Annotated[
        str, typer.Option(help="Protocol the others are compared with (must be run).")
    ] = "sync",
    seeds: Annotated[
        int, typer.Option(help="Number of seeds: every protocol runs on seeds 0..N-1.")
    ] = DEFAULT_SEEDS,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", "-j", help="Worker processes (default: usable CPUs; 1 runs in-process)."
        ),
    ] = None,
    duration: DurationOption = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write runs and summary as JSON to this file.")
    ] = None,
    quiet: QuietOption = False,
    no_check: NoCheckOption = False,
    trace: TraceOption = None,
    ftrace: FtraceOption = None,
    trace_window: TraceWindowOption = None,
    ftrace_ns: FtraceNsOption = False,
    ftrace_kernel: FtraceKernelOption = None,
) -> None:
    """Run protocols on several seeds; mean ± 95 % CI and paired ratios to a baseline."""
    protocols = _split_protocols(protocol) if protocol else list(PROTOCOLS)
    if seeds < 1:
        raise _fail(f"--seeds: must be at least 1 (got {seeds})")
    _check_duration_flag(duration)
    _check_json_path(json_path)
    tracing = _trace_options(trace, ftrace, trace_window, ftrace_ns, ftrace_kernel)
    if tracing is not None:
        try:
            sc = load_scenario(scenario)
        except ScenarioError as err:
            raise _fail(str(err)) from None
        _check_window(tracing, duration if duration is not None else sc.duration_s)
        _check_trace_outputs(
            tracing, [tracing.for_run(p, s) for p in protocols for s in range(seeds)]
        )
    progress = _Progress(quiet)
    try:
        with _keeping_what_finished(progress, lambda p: _keep_partial_compare(p, quiet, json_path)):
            result = compare(
                scenario,
                protocols,
                seeds,
                baseline,
                duration,
                jobs,
                progress=progress.runs_done,
                check=not no_check,
                trace=tracing,
            )
    except ScenarioError as err:
        raise _fail(str(err)) from None
    if not quiet:
        print(compare_summary_table(result))
        for name in result.protocols:
            runs = [r.result for r in result.runs if r.result.protocol == name]
            _note(no_injection_note(runs, result.scenario))
    if json_path is not None:
        _write_json(json_path, result.to_dict())


@app.command("check")
def check_command(
    protocol: Annotated[
        str | None,
        typer.Argument(help="Protocol to check (default with --mutant: the mutant's protocol)."),
    ] = None,
    vcpus: Annotated[int | None, typer.Option(help="vCPUs in the world (1-4; default 2).")] = None,
    tasks: Annotated[int | None, typer.Option(help="Guest tasks (1-4; default 2).")] = None,
    pages: Annotated[int | None, typer.Option(help="Guest pages (1-4; default 2).")] = None,
    depth: Annotated[int | None, typer.Option(help="Stop at this many steps.")] = None,
    mutant: Annotated[
        str | None, typer.Option(help="Put a fixed bug back (see --list-mutants).")
    ] = None,
    list_mutants: Annotated[
        bool, typer.Option("--list-mutants", help="Describe every mutant and exit.")
    ] = False,
    modes: Annotated[
        str | None, typer.Option(help="Access modes, comma-separated (default user,kernel).")
    ] = None,
    hotplug: Annotated[int, typer.Option(help="CPU offline/online cycles per vCPU.")] = 0,
    stay_offline: Annotated[
        bool, typer.Option("--stay-offline", help="An offlined CPU never comes back.")
    ] = False,
    syscalls: Annotated[
        bool | None,
        typer.Option(
            "--syscalls/--no-syscalls",
            help="Tasks' own system calls (default: arm64 with two tasks on a CPU).",
        ),
    ] = None,
    reboot: Annotated[bool, typer.Option("--reboot", help="Allow one reboot/kexec.")] = False,
    send_always: Annotated[
        bool, typer.Option("--send-always", help="Guest sets SEND_ALWAYS (the seed's FIXME).")
    ] = False,
    idle_tick: Annotated[
        bool,
        typer.Option("--idle-tick", help="The tick keeps running in idle (no NO_HZ_IDLE)."),
    ] = False,
    preempt: Annotated[
        bool,
        typer.Option(
            "--preempt/--no-preempt", help="CONFIG_PREEMPT: kernel code preempted on IRQ return."
        ),
    ] = True,
    max_states: Annotated[int, typer.Option(help="Stop after this many states.")] = 2_000_000,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON to this file.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
    reduce: Annotated[
        bool, typer.Option("--reduce/--no-reduce", help="Partial-order reduction (default on).")
    ] = True,
) -> int:
    """Explore every interleaving of a small world; exit 1 if a property is violated."""
    if list_mutants:
        print(mutants_text())
        return 0
    config = _check_config(protocol, vcpus, tasks, pages, mutant, modes, hotplug)
    config = replace(config, reboot=config.reboot or reboot)
    config = replace(config, send_always=config.send_always or send_always)
    config = replace(config, stay_offline=stay_offline, idle_tick=idle_tick, preempt=preempt)
    if syscalls is not None:
        config = replace(config, syscalls=syscalls)
    if (config.hotplug or config.reboot) and not has_lifecycle(config.protocol):
        with_hooks = ", ".join(p for p in PROTOCOLS if has_lifecycle(p))
        raise _fail(
            f"--hotplug/--reboot: {config.protocol}'s guest driver models no CPU hotplug or "
            f"reboot callbacks; use one of {with_hooks}"
        )
    if depth is not None and depth < 1:
        raise _fail(f"--depth: must be at least 1 (got {depth})")
    if max_states < 1:
        raise _fail(f"--max-states: must be at least 1 (got {max_states})")
    _check_json_path(json_path)
    start = time.monotonic()
    last = [start]
    seen = [0, 0]  # states and depth at the last progress call (every 10,000 states)

    def progress(states: int, level: int) -> None:
        seen[:] = [states, level]
        now = time.monotonic()
        if not quiet and now - last[0] >= 10.0:
            last[0] = now
            print(f"apfsim check: {states} states, depth {level}", file=sys.stderr)

    try:
        result = check(
            config, max_depth=depth, max_states=max_states, progress=progress, reduce=reduce
        )
    except KeyboardInterrupt:
        _keep_partial_check(config, seen[0], seen[1], time.monotonic() - start, json_path)
        raise _Exit(130) from None
    print(result_text(result))
    if json_path is not None:
        _write_json(json_path, result_dict(result))
    return 1 if result.violation is not None else 0


def _keep_partial_check(
    config: WorldConfig, states: int, depth: int, seconds: float, json_path: Path | None
) -> None:
    """^C during ``check``: what was explored (as the last progress count saw it), printed
    and written marked partial."""
    partial = CheckResult(config, states=states, depth=depth, complete=False, seconds=seconds)
    print(world_line(partial))
    print(
        f"interrupted after {seconds:.1f} s: at least {states} states explored (counted every "
        f"10000), depth {depth} reached; no violation among them, the search is incomplete"
    )
    if json_path is not None:
        data = result_dict(partial)
        data["transitions"] = None  # not counted until the search ends
        data["partial"] = True
        _write_json(json_path, data)
    where = f"; written to {str(json_path)!r} marked partial" if json_path is not None else ""
    print(f"apfsim: interrupted: check incomplete{where}", file=sys.stderr)


def _check_config(
    protocol: str | None,
    vcpus: int | None,
    tasks: int | None,
    pages: int | None,
    mutant: str | None,
    modes: str | None,
    hotplug: int,
) -> WorldConfig:
    """The world to check: the mutant's own world unless sizes are given."""
    world: dict[str, Any] = {}
    if mutant is not None:
        if mutant not in MUTANTS:
            raise _fail(f"--mutant: unknown {mutant!r}; known: {', '.join(MUTANTS)}")
        m = MUTANTS[mutant]
        if protocol is not None and protocol not in (m.protocol, *m.also):
            raise _fail(f"--mutant: {mutant} is a bug of {m.protocol}, not of {protocol}")
        protocol = protocol or m.protocol
        world = dict(m.world)
        world["mutant"] = mutant
    if protocol is None:
        raise _fail("missing PROTOCOL; give one of " + ", ".join(PROTOCOLS))
    if protocol not in PROTOCOLS:
        raise _fail(f"PROTOCOL: unknown {protocol!r}; known: {', '.join(PROTOCOLS)}")
    for name, value in (("vcpus", vcpus), ("tasks", tasks), ("pages", pages)):
        if value is not None:
            if not 1 <= value <= 4:
                raise _fail(f"--{name}: must be 1 to 4 in a checked world (got {value})")
            world[name] = value
    if modes is not None:
        names = tuple(m.strip() for m in modes.split(","))
        bad = [m for m in names if m not in MODES]
        if bad or not names:
            raise _fail(f"--modes: unknown {bad[0]!r}; known: {', '.join(MODES)}")
        world["modes"] = names
    if not 0 <= hotplug <= 2:
        raise _fail(f"--hotplug: must be 0 to 2 (got {hotplug})")
    if hotplug:
        world["hotplug"] = hotplug
    return WorldConfig(protocol=protocol, **world)


ResultsArgument = Annotated[
    list[Path],
    typer.Argument(
        help="Results JSON files: 'run --json' (one per seed) or 'compare --json'.",
        metavar="RESULTS.json",
        show_default=False,
    ),
]


@app.command("report")
def report_command(
    results: ResultsArgument,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The HTML file to write (one page, offline).")
    ] = Path("report.html"),
) -> None:
    """Write one self-contained HTML report (figures, tables, scenario) of results files."""
    from apfsim.report import ReportError, write_report

    try:
        written = write_report(results, output)
    except ReportError as err:
        raise _fail(str(err)) from None
    print(written)


@app.command("plot")
def plot_command(
    results: ResultsArgument,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for the PNG and SVG files.")
    ] = Path("plots"),
) -> None:
    """Write the report's figures as PNG and SVG files into a directory."""
    from apfsim.report import ReportError, write_plots

    try:
        written = write_plots(results, output)
    except ReportError as err:
        raise _fail(str(err)) from None
    for path in written:
        print(path)


@app.command("sweep")
def sweep_command(
    sweep_file: Annotated[
        str, typer.Argument(help="A sweep TOML file, or a built-in sweep (apfsim sweeps).")
    ],
    executor: Annotated[
        str, typer.Option(help="serial, process (a local pool: default) or dask.")
    ] = "process",
    scheduler: Annotated[
        str | None,
        typer.Option(help="dask scheduler ADDRESS (tcp://host:8786); none: a LocalCluster."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: the usable CPUs).")
    ] = None,
    db: Annotated[
        Path | None,
        typer.Option(help="SQLite results file (default: NAME.sqlite here); re-runs resume."),
    ] = None,
    worker_timeout: Annotated[
        float,
        typer.Option(
            help="dask: give up (exit 2) once the cluster has had no worker this many seconds."
        ),
    ] = WORKER_TIMEOUT_S,
    quiet: QuietOption = False,
) -> None:
    """Run a parameter sweep into SQLite, skipping runs already stored."""
    if executor not in EXECUTORS:
        raise _fail(f"--executor: {executor!r}; choose from {', '.join(EXECUTORS)}")
    if scheduler is not None and executor != "dask":
        raise _fail("--scheduler: only with --executor dask")
    if workers is not None and workers < 1:
        raise _fail(f"--workers: must be at least 1 (got {workers})")
    if not 0 < worker_timeout <= MAX_DURATION_S:
        raise _fail(
            f"--worker-timeout: must be a number of seconds in (0, {MAX_DURATION_S:g}] "
            f"(got {worker_timeout})"
        )
    try:
        spec = load_sweep(sweep_file)
    except SpecError as err:
        raise _fail(str(err)) from None
    path = db if db is not None else Path(f"{spec.name}.sqlite")
    if not _is_dir(path.parent):
        raise _fail(f"--db: directory {str(path.parent)!r} does not exist; create it first")
    try:
        store = SweepStore(path)
    except sqlite3.DatabaseError as err:
        raise _fail(f"--db: {str(path)!r} is not a usable SQLite file ({err})") from None
    progress = _Progress(quiet)
    try:
        summary = run_sweep(
            spec, store, executor, workers, scheduler, progress.sweep_done, worker_timeout
        )
    except SweepRunError as err:
        progress.close()
        raise _fail(f"{err}; {_stored(store, spec.name)} runs stored in {str(path)!r}") from None
    except sqlite3.Error as err:
        # A full disk (or quota) while storing a run: the rows already committed stay.
        progress.close()
        raise _fail(
            f"--db: cannot write {str(path)!r} ({err}); the {_stored(store, spec.name)} runs "
            "stored before are kept; free space and run the same command again to finish"
        ) from None
    except KeyboardInterrupt:
        progress.close()
        print(
            f"apfsim: interrupted: {_stored(store, spec.name)} of {len(spec.runs)} runs stored "
            f"in {str(path)!r}; run the same command again to finish",
            file=sys.stderr,
        )
        raise _Exit(130) from None
    finally:
        progress.close()
        with contextlib.suppress(sqlite3.Error):
            store.close()
    if not quiet:
        print(
            f"sweep {spec.name}: {summary.total} runs ({spec.points} points x "
            f"{len(spec.protocols)} protocols x {len(spec.seeds)} seeds); "
            f"{summary.skipped} already stored, {summary.done} run now "
            f"({summary.failed} failed) with {summary.executor} in {summary.wall_s:.1f} s; "
            f"results in {path}"
        )
    if summary.failed:
        print(
            f"apfsim: {summary.failed} runs failed; their errors are in {path} "
            "(runs.error); run again to retry them",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def _stored(store: SweepStore, sweep: str) -> str:
    """How many runs of ``sweep`` are stored (ok), for a last message; "?" if even reading
    the file fails."""
    try:
        return str(store.count(sweep).get("ok", 0))
    except sqlite3.Error:
        return "?"


@app.command("sweeps")
def sweeps_command() -> None:
    """List the built-in sweeps."""
    for name, description in builtin_sweeps().items():
        print(f"{name:<20} {description}")


@app.command("trace-stats")
def trace_stats_command(
    trace_file: Annotated[
        Path, typer.Argument(help="A text trace: apfsim --ftrace, trace-cmd report, perf script.")
    ],
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the statistics as JSON here.")
    ] = None,
) -> None:
    """Async PF statistics of a kernel-format text trace (ours or a real host's)."""
    _check_json_path(json_path)
    try:
        with trace_file.open(encoding="utf-8", errors="replace") as lines:
            stats = read_trace(lines)
    except FileNotFoundError:
        raise _fail(f"trace-stats: no file {str(trace_file)!r}; give a text trace") from None
    except IsADirectoryError:
        raise _fail(f"trace-stats: {str(trace_file)!r} is a directory; give a file") from None
    except OSError as err:
        raise _fail(f"trace-stats: cannot read {str(trace_file)!r} ({err.strerror})") from None
    if stats.kvm_events == 0:
        for bad in stats.malformed[:5]:
            print(f"apfsim: {trace_file}:{bad.line_no}: malformed: {bad.reason}", file=sys.stderr)
        if stats.malformed_count:
            raise _fail(
                f"trace-stats: all {stats.malformed_count} kvm async-PF lines of "
                f"{str(trace_file)!r} are malformed (see above); is it a trace-cmd report?"
            )
        if _only_headers(trace_file):
            raise _fail(
                f"trace-stats: {str(trace_file)!r} has no events at all, only its header; an "
                "apfsim --ftrace file is empty when its --trace-window held no events (a "
                "window after the run's end): give a window inside the run"
            )
        raise _fail(
            f"trace-stats: {str(trace_file)!r} has no kvm events in trace-cmd, ftrace or "
            "perf-script layout; record with: trace-cmd record -e kvm"
        )
    print(trace_stats_text(stats))
    for bad in stats.malformed:
        print(f"apfsim: {trace_file}:{bad.line_no}: malformed: {bad.reason}", file=sys.stderr)
    if stats.malformed_count > len(stats.malformed):
        print(
            f"apfsim: ... and {stats.malformed_count - len(stats.malformed)} more malformed lines",
            file=sys.stderr,
        )
    if json_path is not None:
        _write_json(json_path, stats.to_dict())


def _only_headers(path: Path) -> bool:
    """The file holds nothing but a ``cpus=N`` header and blank lines: the text trace of a
    window without events (ours, or a ``trace-cmd report`` of an empty recording)."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        return all(not line.strip() or line.startswith("cpus=") for line in lines)


@app.command("sweep-report")
def sweep_report_command(
    db: Annotated[Path, typer.Argument(help="The SQLite file of 'apfsim sweep'.")],
    sweep: Annotated[
        str | None, typer.Option(help="Sweep to report (needed if the file holds several).")
    ] = None,
    by: Annotated[
        list[str] | None,
        typer.Option(
            "--by",
            help="Group by these axes (repeatable or comma-separated; the first is the plots' "
            "x axis). Default: every axis; axes left out are pooled.",
        ),
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Protocol of the ratios (default: the sweep's baseline).")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(help="Metric of the table and plots (default: kind.compute.work_rate)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write .html, .csv or .parquet (DuckDB) instead of a table."
        ),
    ] = None,
) -> None:
    """Aggregate a sweep: mean ± 95 % CI per point and protocol, paired ratios to a baseline."""
    from apfsim.sweep.report import (
        SweepReportError,
        aggregate,
        check_output,
        choose_metric,
        text_table,
        write_output,
    )

    axes = None
    if by:
        axes = [a.strip() for value in by for a in value.split(",")]
        if not all(axes):
            raise _fail(f"--by: empty axis name in {', '.join(map(repr, by))}")
    try:
        if output is not None:
            check_output(output)
        agg = aggregate(db, sweep, axes, baseline)
        chosen = choose_metric(agg, metric)
        if output is None:
            print(text_table(agg, chosen))
            return
        written = write_output(agg, output, chosen)
    except SweepReportError as err:
        raise _fail(str(err)) from None
    print(written)


@app.command("scenarios")
def scenarios_command() -> None:
    """List the built-in scenarios."""
    items = builtin_scenarios()
    width = max(len(name) for name in items)
    for name, description in items.items():
        marker = " (default)" if name == DEFAULT_SCENARIO else ""
        print(f"{name.ljust(width)}  {description}{marker}")


@app.command("protocols")
def protocols_command() -> None:
    """List the protocol designs: name, arch, what it does, and the code or series it follows."""
    width = max(len(name) for name in PROTOCOLS)
    for v in PROTOCOLS.values():
        print(f"{v.name.ljust(width)}  {v.arch:<5}  {v.summary}  [{v.source}]")


@app.command("show")
def show_command(
    scenario: Annotated[str, typer.Argument(help="Built-in scenario name or TOML path.")],
) -> None:
    """Print the fully resolved scenario as TOML (copy it to start your own)."""
    try:
        sc = load_scenario(scenario)
    except ScenarioError as err:
        raise _fail(str(err)) from None
    sys.stdout.write(scenario_to_toml(sc))


def _hide_flag_metavars(command: Any) -> None:
    """A boolean flag takes no value: show no type (``<bool>``) in its help line."""
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    make_help_option = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        _hide_flag_metavars(sub)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: turns every usage error into one line and exit code 2."""
    command = typer.main.get_command(app)
    _hide_flag_metavars(command)
    try:
        rv = command.main(args=argv, prog_name="apfsim", standalone_mode=False)
    except _Exit as done:
        return done.code
    except (typer.Abort, KeyboardInterrupt):
        print("apfsim: interrupted", file=sys.stderr)
        return 130
    except ScenarioError as err:
        print(f"apfsim: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # Click's usage errors (typer vendors click in recent versions, so match by shape).
        format_message = getattr(err, "format_message", None)
        if format_message is None or not hasattr(err, "exit_code"):
            raise
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"apfsim: error: {format_message()}{hint}", file=sys.stderr)
        return 2
    if rv == 130:
        # typer turns a ^C no command caught into a silent exit 130.
        print("apfsim: interrupted", file=sys.stderr)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def cli() -> None:
    """The ``apfsim`` console script."""
    sys.exit(main())
