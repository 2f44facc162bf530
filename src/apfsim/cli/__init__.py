"""``apfsim``: a thin command line over :mod:`apfsim.api`.

Errors in input (scenario files, flags) print one line naming the field and exit 2; no
traceback is shown. Results already computed are printed before any late error.

The commands live in the modules of this package, one per kind of work: ``simulate`` (run,
compare), ``explore`` (check), ``sweeps``, ``reports`` (report, plot, sweep-report,
trace-stats) and ``catalog`` (scenarios, protocols, show); ``common`` holds the typer app, the
shared options and helpers. Importing the package registers every command.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from apfsim.cli import catalog, explore, reports, simulate, sweeps  # noqa: F401  # registers
from apfsim.cli.common import _Exit, app
from apfsim.scenario import (
    ScenarioError,
)

__all__ = ["app", "cli", "main"]


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
