"""apfsim: a simulator of KVM asynchronous page faults (APF).

Example::

    import apfsim
    result = apfsim.run("rfcv2-2020", protocols=["sync", "arm64-rfcv2"], seed=1, duration_s=2)
    for r in result.results:
        print(r.protocol, r.task("compute").work_s)
    df = result.to_pandas()  # with the analysis extra: pip install 'apfsim[analysis]'
"""

from apfsim.analysis import sweep_frame
from apfsim.api import compare_table, run, run_protocol
from apfsim.scenario import Scenario, ScenarioError, load_scenario
from apfsim.version import __version__

__all__ = [
    "Scenario",
    "ScenarioError",
    "__version__",
    "compare_table",
    "load_scenario",
    "run",
    "run_protocol",
    "sweep_frame",
]
