"""A runner that returns its input at once: the pipeline's floor (edge -> Kafka -> agent -> Kafka -> edge).

    aisemble agent data --runner bench.noop_runner:build

Served on the ``data`` service's topics, so the edge's ``POST /data/process`` (operation ``analyze``)
reaches it unchanged; each item's output is its input (``{"records": [...]}``). No model, no work: what
a request costs through this runner is what the pipeline itself costs. ``tasks`` is ``("analyze",)``;
any other task is answered ``unknown_task`` like the real runner does.
"""

from __future__ import annotations

from collections.abc import Sequence

from agents.runner import Item, Outcome, unknown_task
from streams.settings import Settings

NOOP_TASKS: tuple[str, ...] = ("analyze",)


class NoopRunner:
    """Returns each item's input as its output."""

    service = "data"
    tasks = NOOP_TASKS

    def load(self) -> None:
        """Nothing to load."""

    def model_for(self, task: str) -> str:
        return "noop@1"

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        return [dict(i.input) if i.task in self.tasks else unknown_task(i.task, self.tasks) for i in items]


def build(settings: Settings) -> NoopRunner:
    """The ``--runner bench.noop_runner:build`` factory (settings unused)."""
    return NoopRunner()
