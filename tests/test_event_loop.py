"""``AISEMBLE_EVENT_LOOP``: which loop the edge and the agents run on (``streams.event_loop``).

That a running agent and edge really are on uvloop by default is held by
``test_startup.py::test_an_agent_is_live_in_health_once_its_partitions_are_assigned_not_an_interval_later``
(their start-up log lines name the loop).
"""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from streams.event_loop import event_loop_policy, loop_name
from streams.settings import Settings


def test_auto_and_uvloop_give_uvloop_where_it_is_installed() -> None:
    for choice in ("auto", "uvloop"):
        loop = event_loop_policy(choice).new_event_loop()
        try:
            assert isinstance(loop, uvloop.Loop), choice
            assert loop_name(loop) == "uvloop.Loop"
        finally:
            loop.close()


def test_asyncio_gives_asyncios_own_loop() -> None:
    loop = event_loop_policy("asyncio").new_event_loop()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.SelectorEventLoop)
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    loop = event_loop_policy("auto").new_event_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()
    with pytest.raises(ImportError):
        event_loop_policy("uvloop")


def test_the_setting_takes_only_the_three_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AISEMBLE_EVENT_LOOP", "asyncio")
    assert Settings().event_loop == "asyncio"
    monkeypatch.setenv("AISEMBLE_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="event_loop"):
        Settings()
    with pytest.raises(ValueError, match="trio"):
        event_loop_policy("trio")
