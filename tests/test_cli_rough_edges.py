"""Issue 14's CLI rough edges: comma lists everywhere, ``protocols``, ``-h``/``--version``,
help lines without a type for flags, trace windows past the run, named settings in report,
progress with elapsed time and ETA, and the note when a protocol injected nothing."""

from __future__ import annotations

import re

import pytest

from apfsim.registry import PROTOCOLS
from apfsim.version import __version__
from cli_helpers import assert_one_line_error, cli


def test_run_takes_a_comma_list_of_protocols(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["run", "-p", "sync,x86", "--duration", "0.2"], capsys)
    assert code == 0, err
    header = out.splitlines()[1]
    assert "sync" in header and "x86" in header
    code, _, err = cli(["run", "-p", "sync,", "--duration", "0.2"], capsys)
    assert_one_line_error(code, err, "--protocol", "empty name")


def test_protocols_lists_every_design_with_its_source(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = cli(["protocols"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(PROTOCOLS)
    for line, v in zip(lines, PROTOCOLS.values(), strict=True):
        assert v.summary and v.source
        assert v.summary in line and f"[{v.source}]" in line


@pytest.mark.parametrize("command", [[], ["run"], ["compare"], ["check"], ["sweep-report"]])
def test_dash_h_is_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli([*command, "-h"], capsys)
    assert code == 0
    assert "Usage: apfsim" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["--version"], capsys)
    assert code == 0
    assert out == f"apfsim {__version__}\n"


@pytest.mark.parametrize("command", ["run", "compare", "check", "sweep"])
def test_flags_show_no_type_in_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli([command, "--help"], capsys)
    assert code == 0
    assert "<bool>" not in out
    assert re.search(r"--seeds?\s+<int>", out) or command in ("check", "sweep")
