"""Build or remove the optional compiled variant of apfsim's hot modules (mypyc).

    python scripts/compile.py            # compile into src/apfsim (an editable install uses them)
    python scripts/compile.py --clean    # remove them: back to pure Python
    python scripts/compile.py --src DIR  # compile another copy of the package sources

The same source files are compiled; Python imports an extension module in preference to the
.py file beside it, so the editable install runs the compiled code until --clean. Needs a C
compiler and mypy (the ``dev`` extra). Results are bit-identical to the pure-Python build
(tests/test_compiled.py).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The event loop, the run loop and everything it calls per event: engine, vCPU and guest
# CPU, the generic async PF core, every variant and guest driver, host memory and swap,
# the workloads, the invariants and the run checks, and the accumulators; and the model
# checker's world and search, which drive the same run loop per transition.
HOT = [
    "apfsim/engine.py",
    "apfsim/runloop.py",
    "apfsim/invariants.py",
    "apfsim/checking.py",
    "apfsim/snapshot.py",
    "apfsim/guest/*.py",
    "apfsim/host/async_pf.py",
    "apfsim/host/io.py",
    "apfsim/host/memory.py",
    "apfsim/host/backing.py",
    "apfsim/host/postcopy.py",
    "apfsim/host/sched.py",
    "apfsim/host/vcpu.py",
    "apfsim/protocols/*.py",
    "apfsim/workloads/*.py",
    "apfsim/metrics/accumulators.py",
    "apfsim/check/world.py",
    "apfsim/check/search.py",
]


def modules(src: Path) -> list[str]:
    found: list[str] = []
    for pattern in HOT:
        found.extend(sorted(str(p.relative_to(src)) for p in src.glob(pattern)))
    return found


def clean(src: Path) -> int:
    removed = 0
    for path in [*src.glob("*.so"), *src.glob("apfsim/**/*.so"), *src.glob("*.pyd")]:
        path.unlink()
        removed += 1
    shutil.rmtree(src / "build", ignore_errors=True)
    return removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the sources' root")
    args = parser.parse_args()
    src: Path = args.src.resolve()
    if not (src / "apfsim" / "__init__.py").is_file():
        print(
            f"compile: --src {src} holds no apfsim package; give the src directory", file=sys.stderr
        )
        return 2
    if args.clean:
        print(f"compile: removed {clean(src)} compiled module(s) from {src}")
        return 0
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        print("compile: no C compiler (cc or gcc) on PATH; install gcc", file=sys.stderr)
        return 2
    clean(src)
    names = modules(src)
    # The project's mypy settings (the pydantic plugin reads Field defaults), whichever copy.
    cmd = [sys.executable, "-m", "mypyc", "--config-file", str(ROOT / "pyproject.toml"), *names]
    done = subprocess.run(cmd, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], file=sys.stderr)
        print(f"compile: mypyc failed (exit {done.returncode})", file=sys.stderr)
        return 1
    shutil.rmtree(src / "build", ignore_errors=True)
    print(f"compile: {len(names)} modules compiled in {src} (undo: scripts/compile.py --clean)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
