"""Pure units for ``streams.stats.percentile``, the one percentile of the project's reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

import aisemble.monitor
import bench.common
import bench.llm_continuous
import streams.replay_report
from streams.stats import percentile


def test_percentile_is_numpys_linear_interpolation() -> None:
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 19, 20, 21, 100):
        values = list(rng.exponential(50.0, n))
        for q in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_interpolates_between_the_closest_ranks() -> None:
    values = [10.0, 1.0, 4.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(8.8)  # rank 3.8: 4 + 0.8 * (10 - 4)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_no_values_and_q_out_of_range() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    for q in (-1, 100.5):
        with pytest.raises(ValueError, match=r"0\.\.100"):
            percentile([1.0], q)


def test_every_report_uses_the_one_percentile() -> None:
    assert streams.replay_report.percentile is percentile
    assert aisemble.monitor.percentile is percentile
    assert bench.common.percentile is percentile
    assert bench.llm_continuous.percentile is percentile
    # each caller decides what no samples means
    assert streams.replay_report.summary([])["p95"] is None
    assert math.isnan(bench.common.summary_ms([])["p99"])
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert streams.replay_report.summary(values)["p95"] == pytest.approx(8.8)
    assert bench.common.summary_ms(values)["p90"] == pytest.approx(7.6)  # linear now, not nearest-rank (4.0)
