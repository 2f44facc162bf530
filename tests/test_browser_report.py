"""The HTML report in a real browser (headless Chromium): every figure is there, drawn and
not empty, and the page raises no script error and fails to load nothing.

Skipped without Chromium, unless APFSIM_BROWSER_REQUIRED=1 (then it fails); see browser.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from apfsim.api import run
from apfsim.report import render_report
from browser import chromium_or_skip, instrument, page_summary, render_dom
from browser import figure_problems as problems

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) is not None for m in ("matplotlib", "jinja2")),
        reason="the report extra is not installed: pip install -e '.[report]'",
    ),
]

FIGURES = ["throughput", "speedup", "vcpu-time", "latency-cdf"]


def load_in_browser(page: str, path: Path, chromium: str) -> dict[str, Any]:
    path.write_text(instrument(page), encoding="utf-8")
    return page_summary(render_dom(path, chromium=chromium))


def test_report_renders_in_a_browser_without_errors(tmp_path: Path) -> None:
    chromium = chromium_or_skip()  # in the test, not a fixture: a required browser FAILS it
    files = []
    for seed in (0, 1):
        result = run("natapov-2010", ["sync", "x86", "arm64-rfcv2"], seed=seed, duration_s=0.3)
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        files.append(path)
    summary = load_in_browser(render_report(files), tmp_path / "report.html", chromium)
    assert problems(summary, FIGURES) == [], summary
    assert summary["svgs"] == len(FIGURES)


def test_the_harness_sees_errors_and_empty_figures(tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    page = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>broken</title></head>
<body>
<figure class="figure" data-figure="throughput"><svg width="300" height="200"></svg></figure>
<img src="missing-picture.png" alt="">
<script>Promise.reject(new Error("deliberate rejection"));</script>
<script>throw new Error("deliberate failure");</script>
</body></html>
"""
    summary = load_in_browser(page, tmp_path / "broken.html", chromium)
    errors = summary["errors"]
    assert any("deliberate failure" in e for e in errors), errors
    assert any("unhandled rejection: deliberate rejection" in e for e in errors), errors
    assert any("resource failed:" in e and "missing-picture.png" in e for e in errors), errors
    found = problems(summary, FIGURES)
    assert any(p.startswith("errors:") for p in found)
    assert "throughput: 1 svg, 0 paths, 0 texts" in found
    assert any(p.startswith("figures ['throughput']") for p in found)
