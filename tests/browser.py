"""Headless Chromium for tests: load a page from a file, return the DOM after its scripts ran.

Not a test module. ``chromium_or_skip()`` gives the browser's path; without one the test is
skipped, unless ``APFSIM_BROWSER_REQUIRED=1`` (then it fails: a CI that promises a browser
must not pass silently without one). ``instrument()`` adds two scripts to a page: one right
after ``<head>`` that records every script error, unhandled promise rejection, failed
resource load and ``console.error``; one at the end of ``<body>`` that, once the page has
loaded, writes a JSON summary (figures, their inline SVGs, the errors) into
``<pre id="apfsim-test-result">``. ``page_summary()`` reads it back from the dumped DOM.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "RESULT_ID",
    "BrowserError",
    "chromium_or_skip",
    "figure_problems",
    "find_chromium",
    "instrument",
    "page_summary",
    "render_dom",
]

RESULT_ID = "apfsim-test-result"
REQUIRED_ENV = "APFSIM_BROWSER_REQUIRED"

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
    "--dump-dom",
)

_RECORDER = """<script>
window.__apfsimErrors = [];
window.onerror = function (message, source, line, column) {
  window.__apfsimErrors.push("error: " + message + " (" + source + ":" + line + ":" + column + ")");
};
window.addEventListener("error", function (event) {
  var target = event.target;
  if (target && target !== window && (target.src || target.href)) {
    window.__apfsimErrors.push("resource failed: " + (target.src || target.href));
  }
}, true);
window.addEventListener("unhandledrejection", function (event) {
  var reason = event.reason;
  var text = reason && reason.message ? reason.message : String(reason);
  window.__apfsimErrors.push("unhandled rejection: " + text);
});
(function () {
  var original = console.error;
  console.error = function () {
    window.__apfsimErrors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    return original.apply(console, arguments);
  };
})();
</script>"""

_SUMMARY = """<script>
(function () {
  function summary() {
    var figures = Array.prototype.slice.call(document.querySelectorAll(".figure"));
    var svgs = Array.prototype.slice.call(document.querySelectorAll("svg"));
    return {
      figures: figures.length,
      svgs: svgs.length,
      svgs_with_paths: svgs.filter(function (s) { return s.querySelector("path"); }).length,
      names: figures.map(function (f) { return f.getAttribute("data-figure"); }),
      details: figures.map(function (f) {
        var svg = f.querySelector("svg");
        var box = svg ? svg.getBoundingClientRect() : null;
        return {
          name: f.getAttribute("data-figure"),
          svgs: f.querySelectorAll("svg").length,
          paths: svg ? svg.querySelectorAll("path").length : 0,
          texts: svg ? svg.querySelectorAll("text").length : 0,
          width: box ? box.width : 0,
          height: box ? box.height : 0
        };
      }),
      errors: window.__apfsimErrors.slice()
    };
  }
  function write() {
    var pre = document.getElementById("RESULT_ID");
    if (pre === null) {
      pre = document.createElement("pre");
      pre.id = "RESULT_ID";
      document.body.appendChild(pre);
    }
    pre.textContent = JSON.stringify(summary());
  }
  // After load, and a moment later: late errors (rejections, timers) are counted too.
  window.addEventListener("load", function () { write(); setTimeout(write, 200); });
})();
</script>""".replace("RESULT_ID", RESULT_ID)

_RESULT = re.compile(rf'<pre id="{RESULT_ID}">(.*?)</pre>', re.DOTALL)


class BrowserError(Exception):
    """Chromium failed or timed out."""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def chromium_or_skip() -> str:
    """The browser's path; skip the test without one, or fail if one is required."""
    path = find_chromium()
    if path is None:
        message = "no chromium or chromium-browser on PATH (apt-get install chromium)"
        if os.environ.get(REQUIRED_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRED_ENV}=1 requires the browser checks")
        pytest.skip(message)
    return path


def render_dom(html_path: Path, timeout_s: float = 90.0, chromium: str | None = None) -> str:
    """Load ``html_path`` in headless Chromium and return the DOM once its scripts ran."""
    exe = chromium or find_chromium()
    if exe is None:
        raise BrowserError("no chromium or chromium-browser on PATH")
    url = html_path.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="apfsim-chromium-") as profile:
        args = [exe, *_FLAGS, f"--user-data-dir={profile}", url]
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a timeout ends all of it
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise BrowserError(f"chromium took more than {timeout_s:g} s on {url}") from None
    if proc.returncode != 0:
        tail = "\n".join(err.splitlines()[-5:])
        raise BrowserError(f"chromium exited with {proc.returncode} on {url}:\n{tail}")
    if "<html" not in out:
        raise BrowserError(f"chromium printed no DOM for {url}")
    return out


def instrument(page: str) -> str:
    """The page with the error recorder right after ``<head>`` and the summary writer at the
    end of ``<body>``."""
    head = re.search(r"<head\b[^>]*>", page)
    end = page.rfind("</body>")
    if head is None or end < 0:
        raise ValueError("the page has no <head> or no </body>")
    page = page[:end] + _SUMMARY + "\n" + page[end:]
    return page[: head.end()] + "\n" + _RECORDER + page[head.end() :]


def page_summary(dom: str) -> dict[str, Any]:
    """The JSON summary that the instrumented page wrote into its DOM."""
    match = _RESULT.search(dom)
    if match is None:
        raise BrowserError(f"no <pre id={RESULT_ID!r}> in the DOM: the summary script never ran")
    data: dict[str, Any] = json.loads(html.unescape(match.group(1)))
    return data


def figure_problems(summary: dict[str, Any], expected: list[str]) -> list[str]:
    """What is wrong with a page's summary: errors, missing or empty figures."""
    found = []
    if summary["errors"]:
        found.append(f"errors: {summary['errors']}")
    if summary["names"] != expected:
        found.append(f"figures {summary['names']}, expected {expected}")
    if summary["figures"] != len(expected) or summary["svgs_with_paths"] < len(expected):
        found.append(f"{summary['figures']} figures, {summary['svgs_with_paths']} drawn SVGs")
    for d in summary["details"]:
        if d["svgs"] != 1 or d["paths"] < 5 or d["texts"] < 3:
            found.append(f"{d['name']}: {d['svgs']} svg, {d['paths']} paths, {d['texts']} texts")
        if d["width"] < 100 or d["height"] < 100:
            found.append(f"{d['name']}: shown {d['width']}x{d['height']} px")
    return found
