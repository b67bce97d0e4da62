"""Data service (``data``): per-field statistics of JSON records (task ``analyze``).

The analysis is pure (no Kafka, no Redis) and total: mixed types, missing fields, nulls, nested values
and empty inputs are reported, never raised. Numeric statistics use numpy over the numeric values of a
field only (booleans are not numbers); ``std`` is the population standard deviation (ddof=0) and
percentiles use linear interpolation, as numpy does by default.

Cost: ``analyze`` is one pass over the records (linear in field occurrences plus the size of nested
values). The runner refuses, before any analysis, a request past its caps (``max_records``,
``max_fields`` distinct names, ``max_cells`` occurrences) with ``payload_too_large``; settings above
the contract's ceilings (``schemas.data.MAX_FIELDS`` / ``MAX_CELLS``) meet ``invalid_input`` there.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from agents.runner import Failure, Item, Outcome, parse_input, unknown_task
from schemas import ErrorCode
from schemas.data import DATA_TASKS, MAX_CELLS, MAX_FIELDS, AnalyzeInput, over_limits
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
    if len(values) == 1 and math.isfinite(values[0]):  # numpy's answer, without its per-call overhead
        v = values[0]
        return {"min": v, "max": v, "mean": v, "std": 0.0, "p50": v, "p95": v}
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


@dataclass(slots=True)
class _FieldAcc:
    """What one pass over the records gathers about one field."""

    types: Counter[str] = field(default_factory=Counter)
    distinct: set[object] = field(default_factory=set)
    numbers: list[float] = field(default_factory=list)


def analyze(records: Sequence[dict[str, object]]) -> dict[str, object]:
    """Count records and describe every field that appears in any of them.

    One pass over the records, touching each (field, value) pair once, then one summary per field:
    the work is linear in the number of cells (field occurrences) plus the size of nested values.

    Args:
        records: rows as JSON objects; fields may differ from row to row.

    Returns:
        ``{"count": n, "fields": {name: stats}}`` where stats holds ``type`` (the field's JSON type, or
        ``mixed``), ``types`` (count per type), ``count`` (present and not null), ``missing`` (absent or
        null), ``distinct``, and for fields with numeric values ``min``, ``max``, ``mean``, ``std``,
        ``p50``, ``p95``. Fields are listed in order of first appearance.
    """
    accs: dict[str, _FieldAcc] = {}
    for record in records:
        for name, value in record.items():
            acc = accs.get(name)
            if acc is None:
                acc = accs[name] = _FieldAcc()
            if value is None:
                continue
            kind = json_type(value)
            acc.types[kind] += 1
            acc.distinct.add(_distinct_token(value))
            if kind == "number":
                acc.numbers.append(float(value))  # type: ignore[arg-type]

    fields: dict[str, object] = {}
    for name, acc in accs.items():
        types = acc.types
        present = sum(types.values())
        stats: dict[str, object] = {
            "type": "null" if not types else next(iter(types)) if len(types) == 1 else "mixed",
            "types": dict(types),
            "count": present,
            "missing": len(records) - present,
            "distinct": len(acc.distinct),
        }
        if acc.numbers:
            stats.update(_numeric_stats(acc.numbers))
        fields[name] = stats
    return {"count": len(records), "fields": fields}


class DataRunner:
    """The data service's runner: no model, just the analysis, item by item.

    Each item's size is checked against the caps (records, distinct field names, field occurrences)
    before it is validated or analysed, so a request past them costs at most a count up to the cap
    and is answered ``payload_too_large``.
    """

    service = "data"
    tasks = DATA_TASKS

    def __init__(self, max_records: int, max_fields: int = MAX_FIELDS, max_cells: int = MAX_CELLS) -> None:
        self._max_records = max_records
        self._max_fields = max_fields
        self._max_cells = max_cells

    def load(self) -> None:
        analyze([{"warm": 1}])

    def model_for(self, task: str) -> str:
        return f"aisemble-analyze@{ANALYZER_VERSION}"

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        return [self._run_one(item) for item in items]

    def _run_one(self, item: Item) -> Outcome:
        if item.task not in self.tasks:
            return unknown_task(item.task, self.tasks)
        raw = item.input.get("records")
        if isinstance(raw, list):
            problem = over_limits(
                raw, max_fields=self._max_fields, max_cells=self._max_cells, max_records=self._max_records
            )
            if problem is not None:
                return Failure(ErrorCode.PAYLOAD_TOO_LARGE, problem)
        parsed = parse_input(AnalyzeInput, item.input)
        if isinstance(parsed, Failure):
            return parsed
        return analyze(parsed.records)


def build_runner(settings: Settings) -> DataRunner:
    data = settings.data
    return DataRunner(max_records=data.max_records, max_fields=data.max_fields, max_cells=data.max_cells)
