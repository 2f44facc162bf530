"""The CLI's typer app, its shared options and helpers: progress with ETA, one-line
errors (exit 2), flag checks and JSON output."""

from __future__ import annotations

import json
import sys
import time
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
    MAX_DURATION_S,
)
from apfsim.registry import PROTOCOLS
from apfsim.scenario import (
    one_line,
)
from apfsim.trace import TraceOptions, TraceOptionsError
from apfsim.trace.output import TraceWriteError, check_output
from apfsim.version import __version__

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
SchedulerOption = Annotated[
    str | None,
    typer.Option(help="dask scheduler ADDRESS (tcp://host:8786); none: a LocalCluster."),
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
    try:
        options = TraceOptions.from_flags(trace, ftrace, window, ftrace_ns, ftrace_kernel)
    except TraceOptionsError as err:
        raise _fail(str(err)) from None
    return options if options.enabled else None


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
    try:
        if tracing is not None:
            tracing.check_duration(duration_s)
    except TraceOptionsError as err:
        raise _fail(str(err)) from None


def _write_json(json_path: Path, data: dict[str, Any]) -> None:
    """Sorted keys, two-space indent: the same run gives the same bytes."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        json_path.write_text(text)
    except OSError as err:
        raise _fail(f"--json: cannot write {str(json_path)!r} ({err.strerror})") from None
