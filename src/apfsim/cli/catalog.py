"""``apfsim scenarios``, ``protocols`` and ``show``: what is built in."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from apfsim.cli.common import (
    _fail,
    app,
)
from apfsim.registry import PROTOCOLS
from apfsim.scenario import (
    DEFAULT_SCENARIO,
    ScenarioError,
    builtin_scenarios,
    load_scenario,
    scenario_to_toml,
)


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
