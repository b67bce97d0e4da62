"""The agent loops: how consumed events become replies and acknowledgements.

* ``acks``: ``AckTracker``, the only place that decides which events may be acknowledged (and so committed);
* ``base``: what both loops share (feed, rebalance hooks, failure stop, acknowledging through the tracker);
* ``batch``: ``BatchLoop``, natural micro-batches through ``agents.loop.BatchProcessor``;
* ``continuous``: ``ContinuousLoop``, rows joining and leaving a step-wise engine (the LLM).
"""

from __future__ import annotations

from agents.loops.acks import AckTracker
from agents.loops.base import AgentStopped, EventView, LoopBase
from agents.loops.batch import BatchLoop
from agents.loops.continuous import AgentLoopFailed, ContinuousLoop, stepwise

__all__ = [
    "AckTracker",
    "AgentLoopFailed",
    "AgentStopped",
    "BatchLoop",
    "ContinuousLoop",
    "EventView",
    "LoopBase",
    "stepwise",
]
