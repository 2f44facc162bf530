"""pandas, imported only when a DataFrame is asked for (the optional ``analysis`` extra)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType
from typing import Any

__all__ = ["MissingExtraError", "frame", "pandas"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra."""


def pandas() -> ModuleType:
    """The pandas module; MissingExtraError (one line, naming the extra) without it."""
    try:
        return importlib.import_module("pandas")
    except ImportError:
        raise MissingExtraError(
            "pandas is not installed; DataFrames need the analysis extra: "
            "pip install 'apfsim[analysis]'"
        ) from None


def frame(rows: Iterable[dict[str, Any]], index: list[str]) -> Any:
    """A DataFrame of ``rows`` indexed by the ``index`` columns (a MultiIndex if several)."""
    return pandas().DataFrame.from_records(list(rows)).set_index(index)
