"""Runner factories that inject faults into a real agent process (``aisemble agent data --runner ...``).

Used by the fault tests only. Each wraps the real data runner, so everything but the injected fault is
what production runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from agents.data import DataRunner, build_runner
from agents.runner import Item, Outcome
from streams.settings import Settings


class PoisonDataRunner:
    """The data runner, except that an item whose input has ``"poison"`` comes back as a non-object:
    building its reply then raises inside the agent's batch path (not inside ``run_batch``)."""

    service = "data"

    def __init__(self, inner: DataRunner) -> None:
        self.inner = inner
        self.tasks = inner.tasks

    def load(self) -> None:
        self.inner.load()

    def model_for(self, task: str) -> str:
        return self.inner.model_for(task)

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        clean = [i for i in items if "poison" not in i.input]
        results = iter(self.inner.run_batch(clean))
        return ["not an object" if "poison" in i.input else next(results) for i in items]  # type: ignore[misc]


def poison_data(settings: Settings) -> PoisonDataRunner:
    return PoisonDataRunner(build_runner(settings))


class SlowDataRunner(PoisonDataRunner):
    """The data runner, taking ``AISEMBLE_TEST_BATCH_S`` seconds per batch (a slow model, for stop tests);
    with ``AISEMBLE_TEST_MARKER`` set, each batch appends its size to that file as it starts."""

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        marker = os.environ.get("AISEMBLE_TEST_MARKER")
        if marker:  # tells the test a batch is in hand
            with open(marker, "a") as out:
                out.write(f"{len(items)}\n")
        time.sleep(float(os.environ.get("AISEMBLE_TEST_BATCH_S", "2")))
        return super().run_batch(items)


def slow_data(settings: Settings) -> SlowDataRunner:
    return SlowDataRunner(build_runner(settings))


class DelayedDataRunner(PoisonDataRunner):
    """The data runner, except that a batch holding a record with a numeric ``delay_ms`` first sleeps the largest
    one (at most 5 s): a deliberately slow request (the status page's slowest-requests list)."""

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        delays = [
            record.get("delay_ms")
            for item in items
            for record in (item.input.get("records") or [])
            if isinstance(record, dict)
        ]
        delay_ms = max((d for d in delays if isinstance(d, int | float)), default=0)
        time.sleep(min(delay_ms, 5000) / 1000.0)
        return super().run_batch(items)


def delayed_data(settings: Settings) -> DelayedDataRunner:
    return DelayedDataRunner(build_runner(settings))
