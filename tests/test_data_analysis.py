"""The data service's analysis (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from agents.data import DataRunner, analyze
from agents.runner import Failure, Item
from schemas import ErrorCode


def test_brief_payload_statistics() -> None:
    records = [{"id": i, "value": i * 10} for i in range(100)]
    out = analyze(records)
    values = np.arange(100) * 10.0
    value = out["fields"]["value"]  # type: ignore[index]
    assert out["count"] == 100
    assert value["type"] == "number" and value["count"] == 100 and value["missing"] == 0
    assert value["distinct"] == 100
    assert value["min"] == 0 and value["max"] == 990
    assert value["mean"] == pytest.approx(values.mean())
    assert value["std"] == pytest.approx(values.std())
    assert value["p50"] == pytest.approx(np.percentile(values, 50))
    assert value["p95"] == pytest.approx(np.percentile(values, 95))


def test_mixed_types_missing_and_nested_values() -> None:
    records: list[dict[str, object]] = [
        {"a": 1, "b": "x", "n": {"k": [1, 2]}},
        {"a": "2", "c": None, "n": {"k": [1, 2]}},
        {"a": True, "b": "x"},
        {},
    ]
    fields = analyze(records)["fields"]
    a, b, c, n = (fields[k] for k in "abcn")  # type: ignore[index]
    assert a["type"] == "mixed" and a["types"] == {"number": 1, "string": 1, "boolean": 1}
    assert a["missing"] == 1 and a["distinct"] == 3
    assert a["min"] == a["max"] == 1.0  # booleans and numeric strings are not numbers
    assert b["type"] == "string" and b["distinct"] == 1 and b["missing"] == 2 and "mean" not in b
    assert c["type"] == "null" and c["count"] == 0 and c["missing"] == 4
    assert n["type"] == "object" and n["distinct"] == 1


def test_true_and_one_are_distinct_values() -> None:
    assert analyze([{"v": 1}, {"v": True}])["fields"]["v"]["distinct"] == 2  # type: ignore[index]


def test_empty_records() -> None:
    assert analyze([]) == {"count": 0, "fields": {}}


def test_runner_reports_bad_items_alone() -> None:
    runner = DataRunner(max_records=3)
    out = runner.run_batch(
        [
            Item("analyze", {"records": [{"x": 1}]}),
            Item("analyze", {"records": "nope"}),
            Item("analyze", {"records": [1, 2]}),
            Item("analyze", {"records": [{}] * 4}),
            Item("sum", {"records": []}),
        ]
    )
    assert not isinstance(out[0], Failure) and out[0]["count"] == 1
    assert (
        isinstance(out[1], Failure) and out[1].code == ErrorCode.INVALID_INPUT and "records" in out[1].message
    )
    assert isinstance(out[2], Failure) and "records.0" in out[2].message
    assert isinstance(out[3], Failure) and out[3].code == ErrorCode.PAYLOAD_TOO_LARGE
    assert isinstance(out[4], Failure) and out[4].code == ErrorCode.UNKNOWN_TASK
