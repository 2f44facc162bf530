"""Shorthands the host-memory tests share: page states by letter, and gfn arrays."""

from __future__ import annotations

import numpy as np

from apfsim.host.memory import PageState

M, C, S, U, IO = (
    PageState.MAPPED,
    PageState.SWAPCACHE,
    PageState.SWAPPED,
    PageState.UNTOUCHED,
    PageState.IN_IO,
)


def gfns(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)
