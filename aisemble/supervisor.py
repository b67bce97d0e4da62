"""``aisemble run`` as a supervisor: a process that exits is restarted with backoff; the rest keeps serving.

``RestartPolicy`` is the pure part (an injected clock): each process's consecutive failures double its
restart delay from ``initial_s`` up to ``max_s``; a process that stayed up for ``stable_s`` counts as
healthy again and its next failure restarts it after ``initial_s``. ``supervise`` applies it to a
``Pipeline`` until ``should_stop()``; every exit and restart is logged with the exit status.

What it does not do: restart Kafka or Redis (they are the platform, not our processes; the agents and the
edge wait for them and recover by themselves), or give up: a process that keeps failing is retried every
``max_s`` and logged each time, so an operator sees it and the rest of the pipeline keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aisemble.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class RestartPolicy:
    """When to restart each named process; see the module docstring."""

    initial_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, int] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)

    def started(self, name: str) -> None:
        self._started[name] = self.clock()
        self._due.pop(name, None)

    def exited(self, name: str) -> float:
        """Record an exit; returns the delay before the restart."""
        now = self.clock()
        if now - self._started.get(name, now) >= self.stable_s:
            self._failures[name] = 0
        failures = self._failures.get(name, 0)
        delay = min(self.max_s, self.initial_s * (2**failures))
        self._failures[name] = failures + 1
        self._due[name] = now + delay
        return delay

    def due(self) -> list[str]:
        """Processes whose restart time has come."""
        now = self.clock()
        return [name for name, at in self._due.items() if at <= now]

    def waiting(self, name: str) -> bool:
        return name in self._due


def supervise(
    pipeline: Pipeline, should_stop: Callable[[], bool], policy: RestartPolicy | None = None, poll_s: float = 0.5
) -> None:
    """Restart the pipeline's exited processes until ``should_stop()``."""
    policy = policy or RestartPolicy()
    for name in pipeline.procs:
        policy.started(name)
    while not should_stop():
        for name, status in pipeline.exited().items():
            if not policy.waiting(name):
                delay = policy.exited(name)
                log.error("supervisor: %s exited with status %s; restarting in %.1fs", name, status, delay)
        for name in policy.due():
            pipeline.restart(name)
            policy.started(name)
            log.warning("supervisor: restarted %s (pid %d)", name, pipeline.procs[name].pid)
        time.sleep(poll_s)
