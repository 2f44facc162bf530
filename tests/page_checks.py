"""Shared by the report tests: what every generated HTML page must be."""

from __future__ import annotations

import re


def assert_offline_page(html: str, figures: list[str]) -> None:
    """Each named figure is an inline, drawn SVG; nothing to fetch (a URL only as an SVG
    xmlns); no id twice across the inline SVGs."""
    for name in figures:
        block = html.split(f'data-figure="{name}">', 1)[1].split("</figure>", 1)[0]
        assert block.lstrip().startswith("<svg"), name
        assert "<path" in block and "</svg>" in block, name
    assert html.count("<svg") == len(figures)
    for tag in ("<script", "<link", "<img", "<iframe", "@import", "<?xml", "<!DOCTYPE svg"):
        assert tag not in html, tag
    assert not re.search(r"\bsrc=", html)
    urls = re.findall(r"https?://", html)
    xmlns = re.findall(r'\bxmlns(?::\w+)?="https?://[^"]*"', html)
    assert len(urls) == len(xmlns) > 0
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))
