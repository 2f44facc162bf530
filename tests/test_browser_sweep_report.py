"""The sweep report's HTML page in a real browser (headless Chromium): every figure is there,
drawn and not empty, and the page raises no script error and fails to load nothing.

Skipped without Chromium, unless APFSIM_BROWSER_REQUIRED=1 (then it fails); see browser.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from apfsim.sweep.report import aggregate, render_sweep_html
from apfsim.sweep.run import run_sweep
from apfsim.sweep.spec import parse_sweep
from apfsim.sweep.store import SweepStore
from browser import chromium_or_skip, instrument, page_summary, render_dom
from browser import figure_problems as problems

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) is not None for m in ("matplotlib", "jinja2")),
        reason="the report extra is not installed: pip install -e '.[report]'",
    ),
]

DETAIL = ("throughput", "speedup", "vcpu-time", "latency-cdf")
FIGURES = ["sweep-ratio", "sweep-mean"] + [f"point{p}-{f}" for p in (0, 1) for f in DETAIL]


def test_sweep_report_renders_in_a_browser_without_errors(tmp_path: Path) -> None:
    chromium = chromium_or_skip()  # in the test, not a fixture: a required browser FAILS it
    spec = parse_sweep(
        {
            "name": "browser",
            "scenario": "rfcv2-2020",
            "duration_s": 0.3,
            "protocols": ["sync", "x86"],
            "seeds": 2,
            "set": {"host.swap.distribution": "exponential"},
            "grid": {"host.swap.mean_us": [36.0, 55000.0]},
        },
        "browser",
    )
    db = tmp_path / "browser.sqlite"
    store = SweepStore(db)
    try:
        run_sweep(spec, store, "serial")
    finally:
        store.close()
    page = tmp_path / "sweep.html"
    page.write_text(instrument(render_sweep_html(aggregate(db))), encoding="utf-8")
    summary = page_summary(render_dom(page, chromium=chromium))
    assert problems(summary, FIGURES) == [], summary
    assert summary["svgs"] == len(FIGURES)
