"""Data service (``data``): tabular analysis of JSON records.

Task ``analyze``: input ``{"records": [{...}, ...]}``; output the record count and per-field statistics.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DATA_TASKS = ("analyze",)


class AnalyzeInput(BaseModel):
    """Input of the ``analyze`` task."""

    model_config = ConfigDict(extra="forbid")

    records: list[dict[str, object]] = Field(description="Rows as JSON objects; fields may differ per row.")


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


class DataProcessRequest(BaseModel):
    """HTTP body of ``POST /data/process`` (the brief's payload)."""

    model_config = ConfigDict(extra="forbid")

    operation: Literal["analyze"]
    data: AnalyzeInput
    cache: bool | None = None
