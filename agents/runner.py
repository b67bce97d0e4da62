"""The seam between the pipeline and a model: the ``ModelRunner`` protocol and its value types.

A runner knows nothing of Kafka or Redis. The agent loop hands it a micro-batch of ``Item``s and gets
back exactly one ``Outcome`` per item, in order: a JSON-able output dict, or a ``Failure`` for that item
alone. ``run_batch`` is blocking and is always called from a worker thread, never on the event loop.
A runner raising instead of returning fails the whole batch with ``model_error`` (each item answered).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from schemas import ErrorCode


@dataclass(frozen=True, slots=True)
class Item:
    """One request as the runner sees it: a task name, its (unvalidated) JSON input and its deadline.

    ``deadline_ms`` (epoch milliseconds, or None) lets a long-running runner (the LLM) stop work for a
    request whose caller has given up.
    """

    task: str
    input: dict[str, object]
    deadline_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """One item's failure; becomes an error reply with this code and message."""

    code: str
    message: str


Outcome = dict[str, object] | Failure


class ModelRunner(Protocol):
    """A service's model(s) behind one batch call."""

    service: str
    tasks: tuple[str, ...]

    def load(self) -> None:
        """Load weights and warm up. Called once, in a worker thread, before the agent consumes."""

    def model_for(self, task: str) -> str:
        """Name and version of the model that serves ``task``, e.g. ``all-MiniLM-L6-v2@<rev>``."""

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        """Run one micro-batch; return one outcome per item, in order."""


M = TypeVar("M", bound=BaseModel)


def parse_input(model: type[M], data: dict[str, object]) -> M | Failure:
    """Validate ``data`` against ``model``; a ``Failure`` naming the offending fields otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        return Failure(ErrorCode.INVALID_INPUT, describe_validation_error(exc))


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line summary of a pydantic error: ``field.path: message; ...``."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "input"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def unknown_task(task: str, tasks: Sequence[str]) -> Failure:
    return Failure(ErrorCode.UNKNOWN_TASK, f"unknown task {task!r}; expected one of {', '.join(tasks)}")
