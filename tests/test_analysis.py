"""pandas DataFrames of results (issue 14, Analysis): ``to_pandas()`` on run and compare
results and ``sweep_frame(db)``; pandas is the optional ``analysis`` extra."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from apfsim.analysis import MissingExtraError, sweep_frame
from apfsim.api import compare, run
from apfsim.sweep.run import run_sweep
from apfsim.sweep.spec import parse_sweep
from apfsim.sweep.store import SweepStore


def test_run_to_pandas_has_a_row_per_protocol_and_the_metrics() -> None:
    pytest.importorskip("pandas")
    result = run("rfcv2-2020", ["sync", "x86"], seed=2, duration_s=0.3)
    df = result.to_pandas()
    assert list(df.index) == [("sync", 2), ("x86", 2)]
    x86 = result.protocol("x86")
    row = df.loc[("x86", 2)]
    assert row["sim_time_s"] == pytest.approx(0.3)
    assert row["apf.page_ready_injected"] == x86.apf["page_ready_injected"]
    assert row["faults.needs_io"] == x86.faults["needs_io"]
    assert row["faults.fault_in_latency_us.p99"] == x86.faults["fault_in_latency_us"]["p99"]
    assert row["task.compute.work_s"] == x86.task("compute").work_s
    assert row["task.memhog.ops_per_s"] == x86.task("memhog").ops_per_s


def test_compare_to_pandas_has_a_row_per_run() -> None:
    pytest.importorskip("pandas")
    result = compare("rfcv2-2020", ["sync", "arm64-rfcv2"], 2, "sync", 0.2, 1)
    df = result.to_pandas()
    assert list(df.index) == [(p, s) for p in ("sync", "arm64-rfcv2") for s in (0, 1)]
    gated = result.run("arm64-rfcv2", 1).apf["sync_fallback_gated_context"]
    assert gated > 0
    assert df.loc[("arm64-rfcv2", 1), "apf.sync_fallback_gated_context"] == gated


def test_sweep_frame_has_a_row_per_stored_run_with_axis_columns(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    data: dict[str, Any] = {
        "name": "mini",
        "scenario": "rfcv2-2020",
        "duration_s": 0.2,
        "protocols": ["sync", "arm64-rfcv2"],
        "seeds": 1,
        "grid": {"host.swap.mean_us": [200, 2000]},
    }
    db = tmp_path / "mini.sqlite"
    store = SweepStore(db)
    run_sweep(parse_sweep(data, "mini"), store, "serial")
    store.close()
    df = sweep_frame(db)
    assert len(df) == 4
    assert list(df.columns[:4]) == ["point", "host.swap.mean_us", "protocol", "seed"]
    assert sorted(df["host.swap.mean_us"].unique()) == [200, 2000]
    assert "kind.compute.work_rate" in df.columns
    assert df.attrs["sweep"] == "mini" and df.attrs["baseline"] == "sync"


def test_without_pandas_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    result = run("rfcv2-2020", ["sync"], duration_s=0.1)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now fails
    with pytest.raises(MissingExtraError, match=r"pip install 'apfsim\[analysis\]'") as info:
        result.to_pandas()
    assert len(str(info.value).splitlines()) == 1
