"""An agent process: bootstrap one service's agent and run it in the foreground.

Start-up order: settings -> the model's code imported, its weights loaded and warmed up, while a helper thread
makes sure the service's topics exist (waiting up to ``BROKER_WAIT_S`` for a broker that is still starting:
``aisemble run`` starts the agents beside the broker) -> both done -> the Faust app is built
(``agents.wiring.create_agent_app``: the agent, its loop and its rebalance hooks) -> the Faust worker joins
the consumer group and consumes. Nothing is consumed before the model is loaded and the topics exist.
SIGTERM finishes the batch in hand within ``shutdown_grace_s``; a delivery retry that runs out, or a bug in
the loop, ends the process with exit status 3 (its events are delivered again after the restart; ``aisemble
run`` restarts it).

Tracing (``streams.tracing``): set up first when the environment asks for it, the agent reporting as its own
``service.name`` (``aisemble-<service>``), and flushed when the process ends.

What can go wrong: no broker answers within ``BROKER_WAIT_S`` (``KafkaConnectionError``, exit status 1,
after the model has loaded), the broker refuses the agent's credentials (at once, not retried), the model
fails to load (its error, at once).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import faust
from aiokafka.errors import KafkaConnectionError

from agents.metrics import serve_agent_metrics
from agents.runner import ModelRunner
from agents.wiring import EXIT_AGENT_FAILED, create_agent_app
from schemas import Service
from streams import tracing
from streams.event_loop import event_loop_policy, loop_name
from streams.settings import Settings
from streams.topics import ensure_service_topics

log = logging.getLogger(__name__)

BROKER_WAIT_S = 120.0  # how long a starting agent waits for a broker that does not answer yet
BROKER_RETRY_S = 0.5


def build_runner(service: Service, settings: Settings) -> ModelRunner:
    """The service's runner, from ``agents.<service>.build_runner``."""
    module = importlib.import_module(f"agents.{service}")
    runner: ModelRunner = module.build_runner(settings)
    return runner


def load_factory(spec: str) -> Callable[[Settings], ModelRunner]:
    """``module:function`` -> the function (a custom runner factory taking the settings)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"runner factory {spec!r}: expected 'module:function'")
    factory: Callable[[Settings], ModelRunner] = getattr(importlib.import_module(module_name), attr)
    return factory


async def ensure_topics_when_up(
    settings: Settings, service: Service, wait_s: float = BROKER_WAIT_S, retry_s: float = BROKER_RETRY_S
) -> None:
    """The service's topics exist (created where missing), retrying while the broker cannot be reached.

    Raises:
        KafkaConnectionError: no broker answered within ``wait_s`` (only this is retried: a security
            refusal or a broker error is raised at once).
    """
    deadline = time.monotonic() + wait_s
    for attempt in itertools.count():
        try:
            await ensure_service_topics(settings, [service])
            return
        except KafkaConnectionError as exc:
            if time.monotonic() + retry_s > deadline:
                raise
            if attempt == 0:
                log.info("startup %s: no broker at %s yet (%s); waiting", service, settings.kafka_bootstrap, exc)
        await asyncio.sleep(retry_s)


def in_background(work: Callable[[], None], name: str) -> Future[None]:
    """Run ``work`` on a daemon thread (so it never holds up the process's exit); its outcome in the future."""
    done: Future[None] = Future()

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001  (handed to whoever waits on the future)
            done.set_exception(exc)
        else:
            done.set_result(None)

    threading.Thread(target=target, name=name, daemon=True).start()
    return done


def run_agent(service: Service, settings: Settings, runner_factory: str | None = None) -> None:
    """Run one service's agent in the foreground until SIGINT/SIGTERM.

    ``runner_factory`` (``module:function``) serves a custom ``ModelRunner`` on the service's topics instead
    of the built-in one.
    """
    log.info("startup %s: imports done", service)
    tracing.setup(service)  # on only when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set; service.name aisemble-<service>
    try:
        _run_agent(service, settings, runner_factory)
    finally:
        tracing.shutdown()  # flushes the spans still queued


def _run_agent(service: Service, settings: Settings, runner_factory: str | None) -> None:

    def topics() -> None:
        asyncio.run(ensure_topics_when_up(settings, service))
        log.info("startup %s: topics ready", service)

    topics_ready = in_background(topics, f"{service}-topics")  # broker round trips while the model loads
    served = serve_agent_metrics(service, settings)  # None unless AISEMBLE_AGENT_METRICS_PORT is set
    runner = load_factory(runner_factory)(settings) if runner_factory else build_runner(service, settings)
    log.info("startup %s: runner built (its imports done)", service)
    started = time.perf_counter()
    # The model loads, warms up and computes on one thread (agents.loop.BatchProcessor's ``executor``).
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{service}-model")
    compute.submit(runner.load).result()
    log.info("%s model(s) loaded and warm in %.1fs", service, time.perf_counter() - started)
    topics_ready.result()  # raises what the topic creation raised
    # Faust wants the thread to have a loop; its consumer thread makes its own through the same policy.
    asyncio.set_event_loop_policy(event_loop_policy(settings.event_loop))
    event_loop = asyncio.new_event_loop()
    asyncio.set_event_loop(event_loop)
    log.info("startup %s: event loop %s", service, loop_name(event_loop))
    app, loop = create_agent_app(service, settings, runner, served[0] if served else None, compute)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if loop.failure is not None:
            raise SystemExit(EXIT_AGENT_FAILED) from exc
        raise
