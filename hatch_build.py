"""Hatchling build hook: the optional compiled build, switched on by ``APFSIM_COMPILED=1``.

Without the flag it does nothing, and the install stays pure Python with no compiler. With
it, the build environment gets mypy (mypyc) and setuptools, and the hot modules listed in
scripts/compile.py are compiled from the same sources:

* ``pip install .`` (a wheel): compiled in a copy of ``src``; the extension modules go into
  the wheel beside the ``.py`` files, and the wheel is tagged for this platform;
* ``pip install -e .`` (editable): compiled in place in ``src``, which the editable install
  puts on ``sys.path`` (undo with ``python scripts/compile.py --clean``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

FLAG = "APFSIM_COMPILED"


def wanted() -> bool:
    """``APFSIM_COMPILED`` set to 1, true or yes."""
    return os.environ.get(FLAG, "").strip().lower() in ("1", "true", "yes")


class CompiledBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def dependencies(self) -> list[str]:
        """mypyc type-checks what it compiles, so it needs apfsim's own dependencies too."""
        if not wanted():
            return []
        return ["mypy>=1.10", "setuptools>=68", *self.metadata.core.dependencies]

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if not wanted():
            return
        root = Path(self.root)
        if version == "editable":
            self._compile(root, root / "src")
            return
        work = Path(tempfile.mkdtemp(prefix="apfsim-compiled-"))
        src = work / "src"
        shutil.copytree(root / "src", src, ignore=shutil.ignore_patterns("*.so", "build"))
        self._compile(root, src)
        for lib in sorted(src.rglob("*.so")):
            build_data["force_include"][str(lib)] = str(lib.relative_to(src))
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def _compile(self, root: Path, src: Path) -> None:
        script = root / "scripts" / "compile.py"
        done = subprocess.run([sys.executable, str(script), "--src", str(src)], check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{FLAG}=1: scripts/compile.py failed; unset {FLAG} to install pure")
