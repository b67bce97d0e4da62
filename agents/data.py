"""Data service (``data``): per-field statistics of JSON records (task ``analyze``).

The analysis is pure (no Kafka, no Redis) and total: mixed types, missing fields, nulls, nested values
and empty inputs are reported, never raised. Numeric statistics use numpy over the numeric values of a
field only (booleans are not numbers); ``std`` is the population standard deviation (ddof=0) and
percentiles use linear interpolation, as numpy does by default.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import orjson

from agents.runner import Failure, Item, Outcome, parse_input, unknown_task
from schemas import ErrorCode
from schemas.data import DATA_TASKS, AnalyzeInput
from streams.settings import Settings

ANALYZER_VERSION = "1"


def json_type(value: object) -> str:
    """The JSON type name of a decoded JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _distinct_token(value: object) -> bytes | str | int | float | bool:
    if isinstance(value, dict | list):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    if isinstance(value, bool):
        return f"bool:{value}"  # keep True apart from 1
    return value  # type: ignore[return-value]


def _numeric_stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    p50, p95 = np.percentile(arr, [50, 95])
    return {
        "min": float(arr.min()),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "p50": float(p50),
        "p95": float(p95),
    }


def analyze(records: Sequence[dict[str, object]]) -> dict[str, object]:
    """Count records and describe every field that appears in any of them.

    Args:
        records: rows as JSON objects; fields may differ from row to row.

    Returns:
        ``{"count": n, "fields": {name: stats}}`` where stats holds ``type`` (the field's JSON type, or
        ``mixed``), ``types`` (count per type), ``count`` (present and not null), ``missing`` (absent or
        null), ``distinct``, and for fields with numeric values ``min``, ``max``, ``mean``, ``std``,
        ``p50``, ``p95``. Fields are listed in order of first appearance.
    """
    names: dict[str, None] = {}
    for record in records:
        for name in record:
            names.setdefault(name, None)

    fields: dict[str, object] = {}
    for name in names:
        types: Counter[str] = Counter()
        distinct: set[object] = set()
        numbers: list[float] = []
        for record in records:
            value = record.get(name)
            if value is None:
                continue
            kind = json_type(value)
            types[kind] += 1
            distinct.add(_distinct_token(value))
            if kind == "number":
                numbers.append(float(value))  # type: ignore[arg-type]
        present = sum(types.values())
        stats: dict[str, object] = {
            "type": "null" if not types else next(iter(types)) if len(types) == 1 else "mixed",
            "types": dict(types),
            "count": present,
            "missing": len(records) - present,
            "distinct": len(distinct),
        }
        if numbers:
            stats.update(_numeric_stats(numbers))
        fields[name] = stats
    return {"count": len(records), "fields": fields}


class DataRunner:
    """The data service's runner: no model, just the analysis, item by item."""

    service = "data"
    tasks = DATA_TASKS

    def __init__(self, max_records: int) -> None:
        self._max_records = max_records

    def load(self) -> None:
        analyze([{"warm": 1}])

    def model_for(self, task: str) -> str:
        return f"aisemble-analyze@{ANALYZER_VERSION}"

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        return [self._run_one(item) for item in items]

    def _run_one(self, item: Item) -> Outcome:
        if item.task not in self.tasks:
            return unknown_task(item.task, self.tasks)
        parsed = parse_input(AnalyzeInput, item.input)
        if isinstance(parsed, Failure):
            return parsed
        if len(parsed.records) > self._max_records:
            return Failure(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"records: {len(parsed.records)} records exceed the limit of {self._max_records}",
            )
        return analyze(parsed.records)


def build_runner(settings: Settings) -> DataRunner:
    return DataRunner(max_records=settings.data.max_records)
