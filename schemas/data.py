"""Data service (``data``): tabular analysis of JSON records.

Task ``analyze``: input ``{"records": [{...}, ...]}``; output the record count and per-field statistics.

The contract caps the work one request may ask for: at most ``MAX_FIELDS`` distinct field names and
``MAX_CELLS`` field occurrences over all records (``over_limits``); a body past them is invalid (422 at
the edge). An agent may be configured tighter (``settings.data.max_fields`` / ``max_cells``), and
answers ``payload_too_large`` past its own caps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.http import WireSafe

DATA_TASKS = ("analyze",)
MAX_FIELDS = 10_000  # distinct field names per request (contract ceiling)
MAX_CELLS = 5_000_000  # field occurrences over all records per request (contract ceiling)


def over_limits(
    records: Sequence[object], *, max_fields: int, max_cells: int, max_records: int | None = None
) -> str | None:
    """Why ``records`` exceeds a cap, or ``None``. Non-object rows are skipped (they are invalid anyway).

    Counting stops at the first cap passed, so the work is bounded by the caps, not by the input.
    """
    if max_records is not None and len(records) > max_records:
        return f"records: {len(records):,} records exceed the limit of {max_records:,}"
    cells = 0
    names: set[str] = set()
    for record in records:
        if not isinstance(record, dict):
            continue
        cells += len(record)
        if cells > max_cells:
            return f"records: more than {max_cells:,} fields over all records (the limit)"
        names.update(record)
        if len(names) > max_fields:
            return f"records: more than {max_fields:,} distinct field names (the limit)"
    return None


class AnalyzeInput(BaseModel):
    """Input of the ``analyze`` task."""

    model_config = ConfigDict(extra="forbid")

    records: list[dict[str, object]] = Field(description="Rows as JSON objects; fields may differ per row.")

    @field_validator("records")
    @classmethod
    def _within_caps(cls, records: list[dict[str, object]]) -> list[dict[str, object]]:
        problem = over_limits(records, max_fields=MAX_FIELDS, max_cells=MAX_CELLS)
        if problem is not None:
            raise ValueError(problem)
        return records


class FieldStats(BaseModel):
    """Statistics of one field across all records."""

    type: Literal["number", "string", "boolean", "object", "array", "null", "mixed"]
    types: dict[str, int] = Field(description="Count of present values per JSON type.")
    count: int = Field(description="Records where the field is present and not null.")
    missing: int = Field(description="Records where the field is absent or null.")
    distinct: int = Field(description="Distinct present values (compared as canonical JSON).")
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    p50: float | None = None
    p95: float | None = None


class AnalyzeOutput(BaseModel):
    """Output of the ``analyze`` task; numeric statistics cover the numeric values of a field."""

    count: int
    fields: dict[str, FieldStats]


class DataProcessRequest(WireSafe):
    """HTTP body of ``POST /data/process`` (the brief's payload); strict: ``"cache": 0`` is not a boolean."""

    model_config = ConfigDict(extra="forbid", strict=True)

    operation: Literal["analyze"]
    data: AnalyzeInput
    cache: bool | None = Field(default=None, description="true: use the result cache; false: bypass it.")
