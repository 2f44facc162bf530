"""Shared by the CLI tests: run ``apfsim`` in-process, and the one-line error contract."""

from __future__ import annotations

import pytest

from apfsim.cli import main


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``apfsim ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, one line starting "apfsim: error: ", no traceback, every needle in it."""
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), repr(err)
    assert err.startswith("apfsim: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
