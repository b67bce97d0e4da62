"""The data service's work per request is bounded and linear (pure: no Kafka, no Redis).

Growth is asserted by COUNTING work, never by timing: records are dicts that count every field they
hand out (``items``, ``get``, ``[]``, iteration), so ``analyze`` must touch each field occurrence a
bounded number of times whatever the shape. Timings are only printed (``SCALE:`` lines).
"""

from __future__ import annotations

import time
from collections.abc import Callable, ItemsView, Iterator

import orjson
import pytest
from pydantic import ValidationError

from agents.data import DataRunner, analyze, build_runner
from agents.runner import Failure, Item
from schemas import ErrorCode
from schemas.data import MAX_CELLS, MAX_FIELDS, AnalyzeInput, DataProcessRequest, over_limits
from streams.settings import DataSettings, Settings

SIZES = (1_000, 2_000, 4_000, 8_000)


class Touches:
    count = 0


class CountingDict(dict[str, object]):
    """A record that counts each field it gives out, however it is asked for."""

    def __init__(self, data: dict[str, object], touches: Touches) -> None:
        super().__init__(data)
        self._touches = touches

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            self._touches.count += 1
            yield key

    def items(self) -> ItemsView[str, object]:  # type: ignore[override]
        touches = self._touches
        touches.count += len(self)
        return super().items()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self._touches.count += 1
        return super().get(key, default)

    def __getitem__(self, key: str) -> object:
        self._touches.count += 1
        return super().__getitem__(key)


def distinct_keys(n: int) -> list[dict[str, object]]:
    return [{f"k{i}": i} for i in range(n)]


def shared_keys(n: int) -> list[dict[str, object]]:
    return [{"id": i, "value": i * 10, "name": f"n{i % 50}", "tag": None if i % 7 else "x"} for i in range(n)]


SHAPES: dict[str, Callable[[int], list[dict[str, object]]]] = {"distinct": distinct_keys, "shared": shared_keys}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_analyze_work_is_linear_in_cells(shape: str) -> None:
    make = SHAPES[shape]
    figures: dict[str, dict[str, float]] = {}
    per_cell: list[float] = []
    for n in SIZES:
        plain = make(n)
        cells = sum(len(r) for r in plain)
        touches = Touches()
        counted = [CountingDict(r, touches) for r in plain]
        result = analyze(counted)
        assert result["count"] == n
        started = time.perf_counter()
        assert analyze(plain) == result
        elapsed = time.perf_counter() - started
        per_cell.append(touches.count / cells)
        figures[str(n)] = {"cells": cells, "touches": touches.count, "seconds": round(elapsed, 4)}
    print("SCALE:", orjson.dumps({"shape": shape, "analyze": figures}).decode())
    # Each field occurrence is touched a bounded number of times, the same at every size (linear);
    # the quadratic version touched every field of every record: n touches per cell for distinct keys.
    assert max(per_cell) <= 2
    assert per_cell[-1] <= per_cell[0] * 1.01


def test_distinct_field_count_is_reported_exactly() -> None:
    out = analyze([*distinct_keys(3), {"k0": None}])
    assert list(out["fields"]) == ["k0", "k1", "k2"]  # type: ignore[call-overload]
    k0 = out["fields"]["k0"]  # type: ignore[index]
    assert k0["count"] == 1 and k0["missing"] == 3 and k0["p95"] == 0.0 and k0["std"] == 0.0


def one_mib_of_distinct_keys() -> bytes:
    """The worst body the edge lets through: 1 MiB of one-field records, each with a new field name."""
    parts: list[bytes] = []
    size, i = len(b'{"records":[]}'), 0
    while True:
        part = b'{"k%d":%d}' % (i, i)
        if size + len(part) + 1 > 1024 * 1024:
            break
        parts.append(part)
        size += len(part) + 1
        i += 1
    return b'{"records":[' + b",".join(parts) + b"]}"


def test_one_mib_worst_case_body_is_a_fast_failure() -> None:
    body = one_mib_of_distinct_keys()
    raw = orjson.loads(body)
    n = len(raw["records"])
    runner = build_runner(Settings())
    touches = Touches()
    counted: dict[str, object] = {"records": [CountingDict(r, touches) for r in raw["records"]]}
    started = time.perf_counter()
    [outcome] = runner.run_batch([Item("analyze", counted)])
    elapsed = time.perf_counter() - started
    assert isinstance(outcome, Failure) and outcome.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert "distinct field names" in outcome.message and f"{DataSettings().max_fields:,}" in outcome.message
    # Counting stopped at the cap: the records past it were never looked at.
    assert touches.count <= DataSettings().max_fields + 1
    print(
        "SCALE:",
        orjson.dumps(
            {"worst_case_body_bytes": len(body), "records": n, "touches": touches.count, "seconds": round(elapsed, 4)}
        ).decode(),
    )
    # The same body at the edge: refused by the request model (422) past the contract ceiling.
    with pytest.raises(ValidationError, match="distinct field names"):
        DataProcessRequest.model_validate({"operation": "analyze", "data": raw})


def test_one_mib_of_shared_keys_is_analysed() -> None:
    records = [{"id": i, "v": i % 97} for i in range(60_000)]
    body = orjson.dumps({"records": records})
    runner = build_runner(Settings())
    started = time.perf_counter()
    [outcome] = runner.run_batch([Item("analyze", orjson.loads(body))])
    elapsed = time.perf_counter() - started
    assert not isinstance(outcome, Failure) and outcome["count"] == 60_000
    print("SCALE:", orjson.dumps({"shared_body_bytes": len(body), "seconds": round(elapsed, 4)}).decode())


def test_runner_caps_fields_and_cells_with_payload_too_large() -> None:
    runner = DataRunner(max_records=100, max_fields=3, max_cells=10)
    fits, fields, cells, records, bad = runner.run_batch(
        [
            Item("analyze", {"records": [{"a": 1, "b": 2, "c": 3}] * 3}),
            Item("analyze", {"records": [{"a": 1}, {"b": 1}, {"c": 1}, {"d": 1}]}),
            Item("analyze", {"records": [{"a": 1, "b": 2}] * 6}),
            Item("analyze", {"records": [{}] * 101}),
            Item("analyze", {"records": [1, {"a": 1}]}),
        ]
    )
    assert not isinstance(fits, Failure) and fits["count"] == 3
    assert isinstance(fields, Failure) and fields.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert "more than 3 distinct field names" in fields.message
    assert isinstance(cells, Failure) and cells.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert "more than 10 fields" in cells.message
    assert isinstance(records, Failure) and records.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert isinstance(bad, Failure) and bad.code == ErrorCode.INVALID_INPUT and "records.0" in bad.message


def test_contract_ceilings_refuse_at_validation() -> None:
    AnalyzeInput.model_validate({"records": [{f"k{i}": 1 for i in range(MAX_FIELDS)}]})
    with pytest.raises(ValidationError, match=f"more than {MAX_FIELDS:,} distinct field names"):
        AnalyzeInput.model_validate({"records": [{f"k{i}": 1 for i in range(MAX_FIELDS + 1)}]})
    assert over_limits([{"a": 1}] * (MAX_CELLS + 1), max_fields=MAX_FIELDS, max_cells=MAX_CELLS) == (
        f"records: more than {MAX_CELLS:,} fields over all records (the limit)"
    )
    # An agent configured above the ceiling still refuses past it, as invalid input.
    loose = DataRunner(max_records=10**9, max_fields=10**9, max_cells=10**9)
    [outcome] = loose.run_batch([Item("analyze", {"records": [{f"k{i}": 1 for i in range(MAX_FIELDS + 1)}]})])
    assert isinstance(outcome, Failure) and outcome.code == ErrorCode.INVALID_INPUT
