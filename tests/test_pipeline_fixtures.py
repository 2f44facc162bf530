"""Issue 15's acceptance: the results pipeline's outputs are byte-identical to those made
before it merged the result paths (tests/data/pipeline, commit ebdea6d): compare's JSON, a
sweep's ``runs`` rows, and the HTML and figures of ``report``, ``plot`` and ``sweep-report``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

DATA = Path(__file__).parent / "data" / "pipeline"
TEXT = ("compare.json", "run.json", "runs.json", "sweep-report.csv", "sweep-report.txt")

pytestmark = pytest.mark.slow


def _maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipeline")
    _maker().make(out)
    return out


@pytest.mark.parametrize("name", TEXT)
def test_text_outputs_identical(made: Path, name: str) -> None:
    assert (made / name).read_text() == (DATA / name).read_text()


def test_figures_and_html_identical(made: Path) -> None:
    import matplotlib

    record = json.loads((DATA / "digests.json").read_text())
    if matplotlib.__version__ != record["matplotlib"]:
        pytest.skip(
            f"the digests were made with matplotlib {record['matplotlib']}, this is "
            f"{matplotlib.__version__}: its PNG and SVG bytes differ by version"
        )
    wrong = [
        name
        for name, digest in record["sha256"].items()
        if hashlib.sha256((made / name).read_bytes()).hexdigest() != digest
    ]
    assert not wrong, f"differ from the fixture: {wrong}"


@pytest.mark.parametrize("executor", ["process", "dask"])
def test_compare_on_every_executor_gives_the_fixture(executor: str, tmp_path: Path) -> None:
    """compare is a sweep of one point on the runner: a process pool and a dask LocalCluster
    give the bytes the serial run gave before issue 15."""
    maker = _maker()
    args = ["compare", *maker.COMPARE, "-j", "2", "--executor", executor]
    maker.apfsim(tmp_path, *args, "--json", "compare.json", "-q")
    assert (tmp_path / "compare.json").read_text() == (DATA / "compare.json").read_text()
