"""Percentiles: the one function every report of the project uses (replay reports, ``aisemble monitor``, the
benchmarks).

``percentile(values, q)`` is the ``q``-th percentile (0..100) by linear interpolation between the closest
ranks: the value at rank ``(n - 1) * q / 100`` of the sorted values, interpolated between its two neighbours.
This is numpy's default (``method="linear"``, Hyndman and Fan's type 7), so a figure here can be checked with
``numpy.percentile``. With one value every percentile is that value; p0 is the minimum and p100 the maximum.

Pure, no I/O. What can go wrong: no values, or ``q`` outside 0..100, is a ``ValueError`` (a caller that may
have no samples decides what to report instead: ``None``, ``nan``, 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolating linearly between ranks (numpy's default).

    Raises:
        ValueError: ``values`` is empty, or ``q`` is not within 0..100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, not {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))
