"""The Batch API's records on Kafka: stored files, batch state, cancel requests and batch jobs.

Topics (``streams.topics.batch_topics``), all keyed by UTF-8 strings, values JSON of these models:

* ``{prefix}.files`` (compacted, 1 partition): ``{file_id}`` -> ``StoredFile`` (the metadata, written last,
  so a file whose metadata is visible is whole) and ``{file_id}:{n}`` -> the n-th chunk of its bytes (raw,
  at most ``CHUNK_BYTES``). A deleted file is a tombstone for every one of its keys.
* ``{prefix}.batches`` (compacted, 1 partition): ``{batch_id}`` -> ``BatchState`` (written by the batch's
  creator, then only by its runner; ``seq`` grows with every write) and ``{batch_id}:cancel`` ->
  ``BatchCancel`` (written by whichever edge took ``POST /v1/batches/{id}/cancel``; a separate key, so a
  cancel never races the runner's own writes).
* ``{prefix}.batch-jobs`` (``partitions`` partitions, consumer group ``{prefix}-batch-runners``): one
  ``BatchJob`` per batch; the edge that owns its partition runs the batch.
* ``{prefix}.replies.batch_{id}`` (1 partition, one per batch, deleted once the batch is done): the
  ``ReplyEvent`` of every line, request id ``{batch_id}-{line_no}``.

This module imports nothing else of the project but ``schemas``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CHUNK_BYTES = 512 * 1024  # one file chunk record: well under the broker's 1 MiB default record limit

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
FilePurpose = Literal["batch", "batch_output"]


class StoredFile(BaseModel):
    """A file's metadata (OpenAI's ``FileObject`` fields, plus where its bytes are and whose it is)."""

    model_config = ConfigDict(frozen=True)

    id: str
    bytes: int = Field(ge=0)
    created_at: int
    filename: str
    purpose: FilePurpose
    chunks: int = Field(ge=0, description="Chunk records {id}:0 .. {id}:{chunks-1} hold the bytes.")
    owner: str | None = Field(default=None, description="The owner id of the API key that made it (api.auth).")


class RequestCounts(BaseModel):
    model_config = ConfigDict(frozen=True)

    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchErrorEntry(BaseModel):
    """Why a batch failed as a whole (OpenAI's ``BatchError``)."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchState(BaseModel):
    """One batch, as its runner last wrote it (OpenAI's ``Batch`` fields, plus ``owner`` and ``seq``)."""

    model_config = ConfigDict(frozen=True)

    id: str
    seq: int = Field(default=0, ge=0, description="Grows with every write of this batch's state.")
    owner: str | None = None
    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus = "validating"
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[BatchErrorEntry] = Field(default_factory=list)
    request_counts: RequestCounts = RequestCounts()
    metadata: dict[str, str] | None = None


class BatchCancel(BaseModel):
    """A cancel request for a batch (key ``{batch_id}:cancel``)."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    at: int = Field(description="Epoch seconds of the request.")


class BatchJob(BaseModel):
    """The record that makes one edge run a batch (``{prefix}.batch-jobs``, key = batch id)."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
