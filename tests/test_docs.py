"""Every command block in README.md and docs/*.md is checked, and the runnable ones run.

The convention (tests/README.md, "Command blocks in the docs"): a fenced block labelled
``sh`` (or ``shell``, ``bash``, ``console``) holds commands, one per line (a trailing ``\\``
continues a line, ``#`` starts a comment). An HTML comment on the line before a block, which
Markdown renders as nothing, says how the test treats it::

    <!-- test: skip REASON -->        not run (installs, the test suite, Dask, long sweeps)
    <!-- test: synopsis -->           a usage synopsis: flags checked, not run
    <!-- test: apf -->                every run in it must inject not-present (non-zero)
    <!-- test: exit N -->             every command in it must exit N (default 0)
    <!-- test: file NAME -->          (before a non-shell block) written to NAME first
    <!-- test: --duration 2 -->       options set on each apfsim command that takes them

Keywords come first, options last (``<!-- test: apf --duration 2 -->``). The fast tier
parses every block and checks that every ``apfsim`` subcommand and flag exists; the full
tier runs each document's blocks in order, in one temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer.main

from apfsim.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = frozenset({"sh", "shell", "bash", "console"})
MARKER = re.compile(r"^<!--\s*test:(.*?)-->\s*$")
FENCE = re.compile(r"^```(\S*)\s*$")
OPERATORS = frozenset({"&&", "||", "|", ";", "&", "(", ")"})
# Protocols that never inject not-present by design: the baseline, a host whose guest has
# no PV driver, and the memory-fault exit (no async PF at all).
NO_INJECTION = frozenset({"sync", "halt-only", "memory-fault-exit"})
RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class Marker:
    """What a ``<!-- test: ... -->`` comment says about the block after it."""

    skip: str | None = None
    synopsis: bool = False
    apf: bool = False
    exit_code: int = 0
    file: str | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Block:
    """One fenced code block."""

    path: Path
    line: int
    lang: str
    text: str
    marker: Marker = field(default_factory=Marker)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS


def parse_marker(text: str, where: str) -> Marker:
    """``skip REASON`` | ``synopsis`` | ``apf`` | ``exit N`` | ``file NAME``, then options."""
    words = shlex.split(text)
    skip: str | None = None
    synopsis = apf = False
    exit_code = 0
    file: str | None = None
    i = 0
    while i < len(words) and not words[i].startswith("--"):
        word = words[i]
        if word == "skip":
            skip = " ".join(words[i + 1 :]).strip()
            assert skip, f"{where}: 'skip' needs a reason"
            i = len(words)
            break
        if word == "synopsis":
            synopsis = True
        elif word == "apf":
            apf = True
        elif word in ("exit", "file"):
            assert i + 1 < len(words), f"{where}: {word!r} needs a value"
            if word == "exit":
                exit_code = int(words[i + 1])
            else:
                file = words[i + 1]
            i += 1
        else:
            raise AssertionError(f"{where}: unknown test marker word {word!r}")
        i += 1
    return Marker(skip, synopsis, apf, exit_code, file, tuple(words[i:]))


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, each with the marker just before it."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    pending: tuple[int, Marker] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        where = f"{path.relative_to(ROOT)}:{i + 1}"
        marker = MARKER.match(line.strip())
        fence = FENCE.match(line)
        if marker:
            pending = (i, parse_marker(marker.group(1), where))
        elif fence:
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            assert end < len(lines), f"{where}: unclosed code block"
            mark = Marker()
            if pending is not None:
                assert pending[0] == i - 1, f"{where}: a test marker must be the line before"
                mark = pending[1]
                pending = None
            found.append(Block(path, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]), mark))
            i = end
        elif line.strip() and pending is not None:
            raise AssertionError(f"{where}: a test marker must be followed by a code block")
        i += 1
    assert pending is None, f"{path.relative_to(ROOT)}: a test marker at the end"
    return found


def commands(block: Block) -> list[list[str]]:
    """Each command line as shell tokens (operators kept as tokens), comments dropped."""
    joined = block.text.replace("\\\n", " ")
    if block.marker.synopsis:  # a synopsis continues on indented lines
        joined = re.sub(r"\n[ \t]+", " ", joined)
    out: list[list[str]] = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        if tokens:
            out.append(tokens)
    return out


def segments(tokens: list[str]) -> list[list[str]]:
    """A command line split at ``&&``, ``|``, ``;``...: the simple commands in it."""
    parts: list[list[str]] = [[]]
    for token in tokens:
        if token in OPERATORS:
            parts.append([])
        else:
            parts[-1].append(token)
    return [p for p in parts if p]


def is_apfsim(words: list[str]) -> bool:
    return words[0] == "apfsim" or words[0].endswith("/apfsim")


def apfsim_flags() -> dict[str, frozenset[str]]:
    """Every subcommand and the flags it takes, from the CLI itself."""
    group: Any = typer.main.get_command(app)
    gctx = group.context_class(group, **group.context_settings)
    flags = {"": frozenset(o for p in group.get_params(gctx) for o in (*p.opts, *p.secondary_opts))}
    for name, cmd in group.commands.items():
        ctx = cmd.context_class(cmd, parent=gctx, **cmd.context_settings)
        opts = (o for p in cmd.get_params(ctx) for o in (*p.opts, *p.secondary_opts))
        flags[name] = frozenset(o for o in opts if o.startswith("-"))
    return flags


FLAG = re.compile(r"^\[?(--?[A-Za-z][A-Za-z0-9-]*)")


def check_apfsim_words(words: list[str], flags: dict[str, frozenset[str]], where: str) -> None:
    """The subcommand exists and takes every flag the words use."""
    rest = [w.strip("[]") for w in words[1:]]
    rest = [w for w in rest if w and w != "..."]
    if not rest or rest[0].startswith("-"):
        sub = ""
    else:
        sub = rest.pop(0)
        assert sub in flags, f"{where}: apfsim has no subcommand {sub!r}"
    for word in rest:
        m = FLAG.match(word)
        if m and not re.fullmatch(r"-\d.*", word):
            flag = m.group(1).split("=")[0]
            assert flag in flags[sub], f"{where}: 'apfsim {sub}' has no flag {flag}"


ALL_BLOCKS = [b for path in DOCS for b in blocks(path)]


def test_every_block_parses_and_every_apfsim_flag_exists() -> None:
    """Fast: markers are well formed, command blocks are labelled, flags exist."""
    flags = apfsim_flags()
    shell_blocks = 0
    for block in ALL_BLOCKS:
        if not block.is_shell:
            first = next((ln for ln in block.text.splitlines() if ln.strip()), "")
            assert not (block.lang == "" and first.startswith("apfsim ")), (
                f"{block.where}: a block of apfsim commands must be labelled sh"
            )
            assert block.marker.file is None or block.lang != "", block.where
            continue
        shell_blocks += 1
        assert block.marker.file is None, f"{block.where}: 'file' is for non-shell blocks"
        runnable = block.marker.skip is None and not block.marker.synopsis
        for tokens in commands(block):
            for words in segments(tokens):
                if is_apfsim(words):
                    check_apfsim_words(words, flags, block.where)
                else:
                    assert not runnable, (
                        f"{block.where}: {words[0]!r} is not apfsim; mark the block "
                        "<!-- test: skip REASON --> if it cannot run in a test"
                    )
        for opt in block.marker.options:
            if opt.startswith("-"):
                assert any(opt in f for f in flags.values()), f"{block.where}: {opt}?"
    assert shell_blocks >= 10


def test_markers_of_this_file_parse() -> None:
    assert parse_marker(" apf --duration 2 ", "x") == Marker(apf=True, options=("--duration", "2"))
    assert parse_marker(" skip needs root ", "x").skip == "needs root"
    assert parse_marker(" exit 1 ", "x").exit_code == 1
    with pytest.raises(AssertionError):
        parse_marker(" skip ", "x")


def with_options(words: list[str], options: tuple[str, ...], takes: frozenset[str]) -> list[str]:
    """``words`` with each marker option set: its value replaced, or the option appended."""
    out = list(words)
    i = 0
    while i < len(options):
        opt = options[i]
        has_value = i + 1 < len(options) and not options[i + 1].startswith("--")
        value = options[i + 1] if has_value else None
        i += 2 if has_value else 1
        if opt not in takes:
            continue
        if opt in out:
            if value is not None:
                out[out.index(opt) + 1] = value
        else:
            out += [opt] if value is None else [opt, value]
    return out


def injections(data: dict[str, Any]) -> list[tuple[str, int]]:
    """(protocol, not_present_injected) of each run of a run or compare JSON file."""
    runs = data["runs"] if data.get("kind") == "compare" else data["results"]
    return [(r["protocol"], int(r["apf"].get("not_present_injected", 0))) for r in runs]


def assert_apf(data: dict[str, Any], where: str) -> None:
    found = injections(data)
    assert any(p not in NO_INJECTION for p, _ in found), f"{where}: no APF protocol ran"
    for protocol, count in found:
        if protocol not in NO_INJECTION:
            assert count > 0, f"{where}: {protocol} injected nothing: the example shows no APF"


def shell_join(tokens: list[str]) -> str:
    return " ".join(
        t if t in OPERATORS or t in (">", ">>", "<") else shlex.quote(t) for t in tokens
    )


def split_keep(tokens: list[str]) -> list[list[str]]:
    """Simple commands and the operators between them, in order."""
    parts: list[list[str]] = []
    for token in tokens:
        if token in OPERATORS:
            parts.append([token])
        elif parts and parts[-1][0] not in OPERATORS:
            parts[-1].append(token)
        else:
            parts.append([token])
    return parts


def run_block(block: Block, cwd: Path, flags: dict[str, frozenset[str]]) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for n, tokens in enumerate(commands(block)):
        checks: list[Path] = []
        out: list[str] = []
        for piece in split_keep(tokens):
            if piece[0] in OPERATORS or not is_apfsim(piece):
                out += piece
                continue
            words = piece
            sub = words[1] if len(words) > 1 else ""
            words = with_options(words, block.marker.options, flags.get(sub, frozenset()))
            if block.marker.apf and sub in ("run", "compare"):
                if "--json" not in words:
                    words += ["--json", f"apf-check-{n}.json"]
                checks.append(cwd / words[words.index("--json") + 1])
            out += words
        line = shell_join(out)
        done = subprocess.run(
            ["bash", "-c", line],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == block.marker.exit_code, (
            f"{block.where}: `{line.strip()}` exited {done.returncode}\n{done.stderr[-2000:]}"
        )
        for path in checks:
            assert_apf(json.loads(path.read_text()), f"{block.where}: `{line.strip()}`")


def run_python(block: Block, cwd: Path) -> None:
    check = ""
    if block.marker.apf:
        check = "\n\nimport tests_docs_check\ntests_docs_check.check(result.to_dict())\n"
        (cwd / "tests_docs_check.py").write_text(
            "NO_INJECTION = " + repr(sorted(NO_INJECTION)) + "\n"
            "def check(data):\n"
            "    for r in data['results']:\n"
            "        if r['protocol'] not in NO_INJECTION:\n"
            "            assert r['apf']['not_present_injected'] > 0, r['protocol']\n"
        )
    (cwd / "example.py").write_text(block.text + check)
    done = subprocess.run(
        [sys.executable, "example.py"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{block.where}: python example failed\n{done.stderr[-2000:]}"


RUNNABLE_DOCS = sorted(
    {
        b.path
        for b in ALL_BLOCKS
        if (b.is_shell or b.lang == "python") and b.marker.skip is None and not b.marker.synopsis
    }
)


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE_DOCS, ids=lambda p: p.name)
def test_doc_blocks_run(path: Path, tmp_path: Path) -> None:
    """Full tier: a document's runnable blocks, in order, in one directory, succeed."""
    flags = apfsim_flags()
    for block in (b for b in ALL_BLOCKS if b.path == path):
        if block.marker.skip is not None or block.marker.synopsis:
            continue
        if block.marker.file is not None:
            (tmp_path / block.marker.file).write_text(block.text + "\n")
        elif block.is_shell:
            run_block(block, tmp_path, flags)
        elif block.lang == "python":
            run_python(block, tmp_path)
