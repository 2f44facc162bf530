"""Make the results pipeline's outputs, for byte-for-byte comparison (issue 15).

``python tests/data/pipeline/make_fixtures.py OUT`` runs the CLI commands below into OUT.
The files beside this script were made by it at commit ebdea6d, before issue 15 merged the
result paths, and made again at 4148ac0 when the per-arch exit-cost presets (issue 16) changed
the default costs and added ``host_costs`` to the results; tests/test_pipeline_fixtures.py
runs it again and compares every file.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
COMPARE = ["natapov-2010", "-p", "sync,x86,halt-only", "--seeds", "2", "--duration", "0.1"]
RUN = ["natapov-2010", "-p", "sync,x86", "--seed", "1", "--duration", "0.1"]


def apfsim(out: Path, *args: str) -> None:
    """One CLI command, run in ``out`` (file names appear in the reports)."""
    cmd = [sys.executable, "-m", "apfsim", *args]
    subprocess.run(cmd, cwd=out, check=True, stdout=subprocess.DEVNULL)


def runs_rows(db: Path) -> list[dict[str, object]]:
    """The sweep's ``runs`` table, every column, in key order."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = con.execute("SELECT * FROM runs ORDER BY sweep, key").fetchall()
    con.close()
    return [dict(row) for row in rows]


def make(out: Path, executor: str = "serial") -> None:
    out.mkdir(parents=True, exist_ok=True)
    apfsim(out, "compare", *COMPARE, "-j", "1", "--json", "compare.json", "-q")
    apfsim(out, "run", *RUN, "--json", "run.json")
    apfsim(out, "report", "compare.json", "-o", "report.html")
    apfsim(out, "report", "run.json", "-o", "run-report.html")
    apfsim(out, "plot", "compare.json", "-o", "plots")
    db = out / "sweep.sqlite"
    sweep = str(HERE / "sweep.toml")
    apfsim(out, "sweep", sweep, "--executor", executor, "--db", db.name, "-q")
    (out / "runs.json").write_text(json.dumps(runs_rows(db), indent=1, sort_keys=True) + "\n")
    apfsim(out, "sweep-report", db.name, "-o", "sweep-report.html")
    apfsim(out, "sweep-report", db.name, "-o", "sweep-report.csv")
    text = subprocess.run(
        [sys.executable, "-m", "apfsim", "sweep-report", db.name],
        cwd=out,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (out / "sweep-report.txt").write_text(text)
    db.unlink()
    for extra in out.glob("sweep.sqlite-*"):
        extra.unlink()


if __name__ == "__main__":
    make(Path(sys.argv[1]))
