"""The event loop every process runs on (``AISEMBLE_EVENT_LOOP``): uvloop where it is installed.

Every Kafka hop, HTTP request and hand-over between a model thread and the loop goes through the event loop,
so at low load its own cost is a visible share of a round trip: with uvloop (libuv, in C) in the agents, a
1-client light request (``bench/edge_cost.py --points light_1``) answered 15-20% sooner than with asyncio's
selector loop in the same run. The edge passes the same choice to uvicorn's ``loop``; an agent sets the policy
before Faust starts, so Faust's consumer thread, which makes its own loop, runs on it too.

``auto`` (the default) takes uvloop when it imports and asyncio's loop otherwise; ``uvloop`` insists (an
``ImportError`` at start-up where it is missing); ``asyncio`` is the way back if a library misbehaves on uvloop.
"""

from __future__ import annotations

import asyncio


def event_loop_policy(choice: str) -> asyncio.AbstractEventLoopPolicy:
    """The event loop policy for ``choice`` (``auto``, ``uvloop`` or ``asyncio``, as uvicorn's ``--loop``)."""
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"event loop {choice!r}: expected auto, uvloop or asyncio")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop.Loop`` or ``asyncio.unix_events._UnixSelectorEventLoop``: what a start-up log line names."""
    return f"{type(loop).__module__}.{type(loop).__qualname__}"
