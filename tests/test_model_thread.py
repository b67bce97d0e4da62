"""An agent's model loads, warms up and computes on ONE thread (``agents.worker`` -> ``agents.loop``).

torch and llama.cpp run on OpenMP, whose runtime keeps a team of worker threads per calling thread: a model
warmed on one thread and then called from another ran 1.5-2x slower (a MiniLM embed 13.7 ms on the thread that
warmed it, 21-23 ms from another; a SmolLM2 decode step 8.4 vs 15-19 ms at 2 threads). The worker loads the
runner on the thread it then hands to the batch processor; these tests hold that wiring.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from agents import worker
from agents.loop import BatchProcessor
from agents.runner import Item, Outcome
from agents.wiring import create_agent_app
from aisemble.pipeline import throwaway_prefix
from streams.settings import Settings

pytestmark = pytest.mark.integration


class _ThreadRunner:
    """Records the thread of each call."""

    service = "data"
    tasks: tuple[str, ...] = ("analyze",)

    def __init__(self) -> None:
        self.load_thread: int | None = None
        self.batch_threads: list[int] = []

    def load(self) -> None:
        self.load_thread = threading.get_ident()

    def model_for(self, task: str) -> str:
        return "thread-runner"

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        self.batch_threads.append(threading.get_ident())
        return [{"ok": True} for _ in items]


class _Stop(Exception):
    pass


def test_the_worker_loads_the_model_on_the_thread_it_hands_to_the_processor(
    infra_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _ThreadRunner()
    handed: dict[str, object] = {}

    def create(service: str, settings: Settings, runner: object, observer: object = None, executor: object = None):  # type: ignore[no-untyped-def]
        handed["executor"] = executor
        raise _Stop  # before Faust's worker starts

    monkeypatch.setattr(worker, "build_runner", lambda service, settings: runner)
    monkeypatch.setattr(worker, "create_agent_app", create)
    settings = infra_settings.model_copy(update={"topic_prefix": throwaway_prefix()})
    with pytest.raises(_Stop):
        worker.run_agent("data", settings)
    executor = handed["executor"]
    assert isinstance(executor, ThreadPoolExecutor)
    compute = executor.submit(threading.get_ident).result()
    assert runner.load_thread == compute and compute != threading.get_ident()


def test_the_agent_app_hands_the_executor_to_its_processor_and_a_processor_without_one_makes_its_own(
    infra_settings: Settings,
) -> None:
    runner = _ThreadRunner()
    with ThreadPoolExecutor(max_workers=1) as executor:
        settings = infra_settings.model_copy(update={"topic_prefix": throwaway_prefix()})
        _, loop = create_agent_app("data", settings, runner, None, executor)
        assert loop.processor.executor is executor
    own = BatchProcessor("data", runner, None, topic_prefix="p", cache=None, cache_ttl_s=60)  # type: ignore[arg-type]
    assert isinstance(own.executor, ThreadPoolExecutor) and own.executor is not executor
