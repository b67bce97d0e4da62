"""An agent process: bootstrap one service's agent and run it in the foreground.

Start-up order: settings -> topics exist -> model loaded and warmed up -> the Faust app is built
(``agents.wiring.create_agent_app``: the agent, its loop and its rebalance hooks) -> the Faust worker joins
the consumer group and consumes. SIGTERM finishes the batch in hand within ``shutdown_grace_s``; a delivery
retry that runs out, or a bug in the loop, ends the process with exit status 3 (its events are delivered
again after the restart; ``aisemble run`` restarts it).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable

import faust

from agents.metrics import serve_agent_metrics
from agents.runner import ModelRunner
from agents.wiring import EXIT_AGENT_FAILED, create_agent_app
from schemas import Service
from streams.settings import Settings
from streams.topics import ensure_service_topics

log = logging.getLogger(__name__)


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


def run_agent(service: Service, settings: Settings, runner_factory: str | None = None) -> None:
    """Run one service's agent in the foreground until SIGINT/SIGTERM.

    ``runner_factory`` (``module:function``) serves a custom ``ModelRunner`` on the service's topics instead
    of the built-in one.
    """
    log.info("startup %s: imports done", service)
    asyncio.run(ensure_service_topics(settings, [service]))
    log.info("startup %s: topics ready", service)
    served = serve_agent_metrics(service, settings)  # None unless AISEMBLE_AGENT_METRICS_PORT is set
    runner = load_factory(runner_factory)(settings) if runner_factory else build_runner(service, settings)
    log.info("startup %s: runner built (its imports done)", service)
    started = time.perf_counter()
    runner.load()
    log.info("%s model(s) loaded and warm in %.1fs", service, time.perf_counter() - started)
    asyncio.set_event_loop(asyncio.new_event_loop())  # asyncio.run above cleared it; Faust wants one
    app, loop = create_agent_app(service, settings, runner, served[0] if served else None)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if loop.failure is not None:
            raise SystemExit(EXIT_AGENT_FAILED) from exc
        raise
