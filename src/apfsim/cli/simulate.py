"""``apfsim run`` and ``apfsim compare``: what finished is printed and written even when a
run fails or ^C comes."""

from __future__ import annotations

import contextlib
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from apfsim.api import (
    DEFAULT_PROTOCOLS,
    DEFAULT_SEEDS,
    CompareResult,
    Interrupted,
    check_protocols,
    compare,
    compare_summary_table,
    compare_table,
    run,
)
from apfsim.cli.common import (
    DurationOption,
    FtraceKernelOption,
    FtraceNsOption,
    FtraceOption,
    NoCheckOption,
    QuietOption,
    SchedulerOption,
    TraceOption,
    TraceWindowOption,
    _check_duration_flag,
    _check_json_path,
    _check_trace_outputs,
    _check_window,
    _Exit,
    _fail,
    _Progress,
    _split_protocols,
    _trace_options,
    _write_json,
    app,
)
from apfsim.metrics.notes import no_injection_note
from apfsim.metrics.results import RunResult
from apfsim.registry import PROTOCOLS
from apfsim.runner import RunnerError
from apfsim.scenario import (
    DEFAULT_SCENARIO,
    ScenarioError,
    load_scenario,
    parse_toml,
    with_overrides,
)
from apfsim.simulation import InvariantViolation
from apfsim.trace.output import TraceWriteError


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
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a scenario key (dotted, as apfsim show prints it; the flag may "
            "repeat), e.g. --set postcopy.preempt=true. VALUE is a TOML value, or a string.",
        ),
    ] = None,
) -> None:
    """Run a scenario under protocols on one seed and print the comparison."""
    protocols = _split_protocols(protocol) if protocol else list(DEFAULT_PROTOCOLS)
    try:
        check_protocols(protocols)
    except ScenarioError as err:
        raise _fail(str(err)) from None
    if seed < 0:
        raise _fail(f"--seed: must be a non-negative integer (got {seed})")
    _check_duration_flag(duration)
    _check_json_path(json_path)
    tracing = _trace_options(trace, ftrace, trace_window, ftrace_ns, ftrace_kernel)
    try:
        sc = load_scenario(scenario)
        if overrides:
            sc = with_overrides(sc, _parse_overrides(overrides))
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


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` flags as dotted keys and values: VALUE read as a TOML value
    (``true``, ``2``, ``0.5``, ``"x"``), else taken as a string (``2m``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _fail(f"--set: {item!r} is not KEY=VALUE; e.g. --set postcopy.preempt=true")
        try:
            value: Any = parse_toml(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[key] = value
    return out


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
    executor: Annotated[
        str | None,
        typer.Option(help="serial, process or dask (default: process; serial with -j 1)."),
    ] = None,
    scheduler: SchedulerOption = None,
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
                executor=executor,
                scheduler=scheduler,
            )
    except (ScenarioError, RunnerError) as err:
        raise _fail(str(err)) from None
    if not quiet:
        print(compare_summary_table(result))
        for name in result.protocols:
            runs = [r.result for r in result.runs if r.result.protocol == name]
            _note(no_injection_note(runs, result.scenario))
    if json_path is not None:
        _write_json(json_path, result.to_dict())
