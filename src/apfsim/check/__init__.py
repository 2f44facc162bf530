"""The model checker: the simulator's protocol code over every interleaving of a small world."""

from apfsim.check.search import CheckResult, Counterexample, check
from apfsim.check.world import World, WorldConfig, WorldConfigError

__all__ = ["CheckResult", "Counterexample", "World", "WorldConfig", "WorldConfigError", "check"]
