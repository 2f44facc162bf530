"""``apfsim check``: the model checker over a small world, with its mutants."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from apfsim.check import WorldConfig, WorldConfigError, check
from apfsim.check.mutants import MUTANTS
from apfsim.check.report import mutants_text, result_dict, result_text, world_line
from apfsim.check.search import CheckResult
from apfsim.cli.common import (
    _check_json_path,
    _Exit,
    _fail,
    _write_json,
    app,
)
from apfsim.registry import PROTOCOLS


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
    stream: Annotated[
        bool,
        typer.Option(
            "--postcopy-stream",
            help="Postcopy: the background stream may place any missing page at any moment.",
        ),
    ] = False,
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
    flags = {
        "vcpus": vcpus,
        "tasks": tasks,
        "pages": pages,
        "modes": None if modes is None else tuple(m.strip() for m in modes.split(",")),
        "hotplug": hotplug or None,  # 0 keeps the mutant world's
        "stay_offline": stay_offline,
        "syscalls": syscalls,
        "reboot": reboot,
        "send_always": send_always,
        "idle_tick": idle_tick,
        "preempt": preempt,
        "stream": stream,
    }
    config = _check_config(protocol, mutant, flags)
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


def _check_config(protocol: str | None, mutant: str | None, flags: dict[str, Any]) -> WorldConfig:
    """The world to check: the mutant's own world, changed by the flags given (not None);
    :class:`WorldConfig` refuses a bad one."""
    world: dict[str, Any] = {}
    if mutant is not None:
        m = MUTANTS.get(mutant)
        world = {} if m is None else dict(m.world)
        protocol = protocol or (m.protocol if m else "")  # "": WorldConfig names the mutant
    elif protocol is None:
        raise _fail("missing PROTOCOL; give one of " + ", ".join(PROTOCOLS))
    for name, value in flags.items():
        if name in ("reboot", "send_always"):
            value = value or world.get(name, False)
        if value is not None:
            world[name] = value
    try:
        return WorldConfig(protocol=protocol, mutant=mutant, **world)
    except WorldConfigError as err:
        raise _fail(str(err)) from None
