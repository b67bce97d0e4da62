"""What faust-streaming 0.15.3 does with acknowledged offsets on a revoke, and what ``CommittingConsumer``
(``streams.app``) does about it. Units on Faust's own consumer object (not started; no broker is contacted):
the library's order of operations is what the agents rely on, so it is pinned here."""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Iterable, Mapping

import faust
import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP

from streams.app import CommittingConsumer, create_app, listen_rebalance
from streams.settings import Settings

TPS = {TP("t", 0), TP("t", 1)}


def _ack_offsets(consumer: FaustConsumer, tp: TP, offsets: list[int]) -> None:
    consumer._committed_offset[tp] = None
    consumer._acked[tp] = list(offsets)
    consumer._acked_index[tp] = set(offsets)


async def test_faust_forgets_acked_offsets_of_revoked_partitions_before_the_app_hears_of_the_revoke() -> None:
    """Why ``CommittingConsumer`` exists: by the time the app's revoke handling runs (where
    ``stream_wait_empty`` would commit), Faust's consumer has already dropped the acks of the revoked
    partitions, so nothing acknowledged since the last periodic commit is ever committed."""
    app = faust.App(f"probe-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:9092")
    consumer = app.consumer
    tp = TP("t", 0)
    _ack_offsets(consumer, tp, [0, 1, 2])
    assert consumer._new_offset(tp) == 3  # what a commit would write now
    seen: dict[str, object] = {}

    async def app_side(revoked: set[TP]) -> None:
        seen["acked"] = dict(consumer._acked)
        seen["new_offset"] = consumer._new_offset(tp)

    consumer._on_partitions_revoked = app_side  # type: ignore[assignment]
    await FaustConsumer.on_partitions_revoked(consumer, {tp})
    print("FAUST-REVOKE:", seen)
    assert tp not in seen["acked"]  # type: ignore[operator]
    assert seen["new_offset"] is None  # nothing left to commit for it


class _Listener:
    def __init__(self, consumer: FaustConsumer, order: list[str]) -> None:
        self.consumer, self.order = consumer, order
        self.assigned: list[set[Hashable]] = []
        self.committed_offsets: list[dict[Hashable, int]] = []

    def on_assigned(self, assigned: Iterable[Hashable]) -> None:
        self.assigned.append(set(assigned))

    async def revoking(self, revoked: Iterable[Hashable]) -> None:
        self.order.append("loop settles")
        _ack_offsets(self.consumer, TP("t", 1), [0, 1])  # the loop's batch in hand settled meanwhile

    def committed(self, offsets: Mapping[Hashable, int]) -> None:
        self.committed_offsets.append(dict(offsets))

    def forget(self, revoked: Iterable[Hashable]) -> None:
        self.order.append("loop forgets")


async def test_the_agents_consumer_lets_the_loop_settle_then_commits_acked_offsets_before_faust_forgets_them() -> None:
    app = create_app(Settings(topic_prefix=f"rc{uuid.uuid4().hex[:6]}"), "data")
    consumer = app.consumer
    assert isinstance(consumer, CommittingConsumer)
    order: list[str] = []
    listener = _Listener(consumer, order)
    listen_rebalance(app, listener)
    _ack_offsets(consumer, TP("t", 0), [0, 1, 2, 3])
    committed: dict[TP, int | None] = {}

    async def commit(topics: object = None, start_new_transaction: bool = True) -> bool:
        order.append("commit")
        assert isinstance(topics, set)
        committed.update({tp: consumer._new_offset(tp) for tp in topics})
        return True

    async def app_side(revoked: set[TP]) -> None:
        order.append("faust forgets")

    consumer.commit = commit  # type: ignore[method-assign]
    consumer._on_partitions_revoked = app_side  # type: ignore[assignment]
    await consumer.on_partitions_revoked(set(TPS))
    assert order == ["loop settles", "commit", "loop forgets", "faust forgets"]
    assert committed == {TP("t", 0): 4, TP("t", 1): 2}  # what was acknowledged, including what settled last
    assert TP("t", 0) not in consumer._acked  # Faust's own cleanup still ran

    async def assigned_side(assigned: set[TP], generation_id: int = 0) -> None:
        order.append("faust assigns")

    consumer._on_partitions_assigned = assigned_side  # type: ignore[assignment]
    consumer.app.on_rebalance_return = lambda: None  # type: ignore[method-assign]
    await consumer.on_partitions_assigned({TP("t", 1)})
    assert listener.assigned == [{TP("t", 1)}] and order[-1] == "faust assigns"


def test_listen_rebalance_refuses_an_app_without_the_committing_consumer() -> None:
    app = faust.App(f"probe-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:9092")
    with pytest.raises(TypeError, match="CommittingConsumer"):
        listen_rebalance(app, _Listener(app.consumer, []))


async def test_the_loop_hears_only_commits_the_broker_took_and_only_of_assigned_partitions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Releases after the commit (``agents.loops.releases``) rely on this: a failed commit, or a partition
    no longer assigned (Faust discards its commit), must never be reported as committed."""
    app = create_app(Settings(topic_prefix=f"rc{uuid.uuid4().hex[:6]}"), "vision")
    consumer = app.consumer
    assert isinstance(consumer, CommittingConsumer)
    listener = _Listener(consumer, [])
    listen_rebalance(app, listener)
    outcome = {"did_commit": True}

    async def faust_commit(self: object, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        return outcome["did_commit"]

    monkeypatch.setattr(FaustConsumer, "_commit_offsets", faust_commit)
    monkeypatch.setattr(consumer, "assignment", lambda: {TP("t", 0)})
    assert await consumer._commit_offsets({TP("t", 0): 5, TP("t", 1): 9}) is True
    assert listener.committed_offsets == [{TP("t", 0): 5}]
    outcome["did_commit"] = False
    assert await consumer._commit_offsets({TP("t", 0): 7}) is False
    assert listener.committed_offsets == [{TP("t", 0): 5}]
