"""A generated trace in a real browser (headless Chromium): a page parses it and checks it
with the trace-event rules a viewer applies (tests/trace_rules.js): tracks, every async
``b`` with its ``e``, flows bound to slices. A broken trace must be caught by the same page.

Skipped without Chromium, unless APFSIM_BROWSER_REQUIRED=1 (then it fails); see browser.py.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest

from apfsim.cli import main
from browser import chromium_or_skip, instrument, page_summary, render_dom

pytestmark = pytest.mark.slow  # the browser: the full tier

RULES = (Path(__file__).parent / "trace_rules.js").read_text(encoding="utf-8")
CHECK_ID = "apfsim-trace-check"


def check_in_browser(doc_text: str, tmp_path: Path, chromium: str) -> dict[str, Any]:
    embedded = doc_text.replace("</", "<\\/")  # a JSON escape, so no "</script>" inside
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>trace check</title></head>
<body>
<script id="trace" type="application/json">{embedded}</script>
<script>{RULES}</script>
<script>
  const doc = JSON.parse(document.getElementById("trace").textContent);
  const pre = document.createElement("pre");
  pre.id = "{CHECK_ID}";
  pre.textContent = JSON.stringify(checkTrace(doc));
  document.body.appendChild(pre);
</script>
</body></html>
"""
    path = tmp_path / "trace-check.html"
    path.write_text(instrument(page), encoding="utf-8")
    dom = render_dom(path, chromium=chromium)
    assert page_summary(dom)["errors"] == []
    match = re.search(rf'<pre id="{CHECK_ID}">(.*?)</pre>', dom, re.DOTALL)
    assert match is not None, "the checking script did not run"
    result: dict[str, Any] = json.loads(html.unescape(match.group(1)))
    return result


def test_default_scenario_trace_passes_the_viewer_rules_in_a_browser(tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    out = tmp_path / "default.json"
    args = ["run", "-p", "arm64-rfcv2", "--duration", "33", "--quiet"]
    assert main([*args, "--trace", str(out), "--trace-window", "32:33"]) == 0
    result = check_in_browser(out.read_text(), tmp_path, chromium)
    assert result["ok"], result["error"]
    assert {"vCPU 0", "vCPU 0: APF signals", "memhog (cpu 0)", "compute (cpu 0)"} <= set(
        result["tracks"]
    )
    assert result["asyncPairs"] > 10 and result["flows"] > 10 and result["slices"] > 100
    assert result["counters"] == ["resident", "swap queue", "vCPU 0 APFs"]
    # Exact end/start equality on each thread, in the browser's own double arithmetic: the
    # rules nest with no tolerance, and most slices end exactly where the next begins.
    assert result["touching"] > 100


def test_the_browser_check_catches_broken_traces(tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    meta = {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "v"}}
    x = {"ph": "X", "cat": "apf", "name": "a", "pid": 1, "tid": 1, "ts": 1.0, "dur": 2.0}
    broken = {
        "unpaired async": [meta, x, {**x, "ph": "b", "id2": {"local": 7}, "dur": None}],
        "global async id": [
            meta,
            {**x, "ph": "b", "id": 7, "dur": None},
            {**x, "ph": "e", "id": 7, "dur": None},
        ],
        # DevTools nests the second under the first: 4782.247 + 1114.649 > 5896.896.
        "float end past the next start": [
            meta,
            {**x, "ts": 4782.247, "dur": 1114.649},
            {**x, "ts": 5896.896, "dur": 1.0},
        ],
        "unbound flow": [
            meta,
            x,
            {"ph": "s", "cat": "apf", "id": 1, "pid": 1, "tid": 1, "ts": 1.0},
            {"ph": "f", "cat": "apf", "id": 1, "pid": 1, "tid": 1, "ts": 1.5},
        ],
        "overlap": [meta, x, {**x, "ts": 2.0, "dur": 5.0}],
    }
    for what, events in broken.items():
        result = check_in_browser(json.dumps({"traceEvents": events}), tmp_path, chromium)
        assert not result["ok"], what
