"""Consumer-lag arithmetic: offsets sampled twice -> lag, consumption rate and time to drain, per partition.

Pure: no Kafka, no clock, no I/O. ``streams.lag_probe`` takes the samples (:class:`Snapshot`) from the broker
with an injected clock; :func:`compute` turns the last two into a :class:`LagReport`, which ``aisemble lag``
prints and ``GET /lag`` returns (``LagReport.as_dict``).

Definitions (per group, topic and partition):

* **lag** = end offset - the position the group resumes from. That position is the committed offset; with no
  commit yet (a new group, or a partition it never committed) it is the log start offset (the oldest record
  still kept), so a new group's lag counts what it would still have to read, an empty partition has lag 0,
  and a partition whose old records were deleted by retention is not counted from offset 0. A committed
  offset below the log start counts from the log start too (the consumer resets there). Lag is never < 0.
* **rate_per_s** = (resume position now - resume position at the previous sample) / seconds between the
  samples: the group's consumption rate (the resume position is the one the lag counts from, so a group's
  first commit counts from the log start, and a partition never committed has rate 0). Unknown (None)
  without a previous sample of the group or partition, when the position went backwards (an offset reset),
  or when no time passed.
* **drain_s** = lag / rate: how long the backlog lasts at the present rate, ignoring new arrivals. 0 when
  the lag is 0; None when the rate is unknown or 0 while there is lag ("not draining": the group is paused,
  dead, or has no members).

Group totals add the partitions up (rates over the partitions whose rate is known). A service's agent group
also has totals per lane (``lanes``): ``interactive`` over its ``.requests`` topic, ``bulk`` over its ``.bulk``
topic (``streams.topics``), so the time to drain of each lane shows on its own.

What can go wrong: nothing here raises on broker data; offsets that make no sense (an end below the start)
are clipped so the lag stays >= 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LANES: tuple[str, ...] = ("interactive", "bulk")

TopicPartitionKey = tuple[str, int]
"""(topic, partition): the key of every offset map here (aiokafka's ``TopicPartition`` is such a tuple)."""


@dataclass(frozen=True, slots=True)
class GroupSample:
    """One consumer group as the broker described it at one moment.

    Attributes:
        group: the consumer group id.
        state: the coordinator's state: ``Stable``, ``PreparingRebalance``, ``CompletingRebalance``,
            ``Empty`` (no live members; offsets kept), ``Dead`` (no such group), or ``Unknown``.
        members: live members now.
        topics: the topics reported for the group (its own request topic, what it committed or subscribes to).
        committed: committed offsets; a partition with no commit is absent.
    """

    group: str
    state: str
    members: int
    topics: tuple[str, ...]
    committed: Mapping[TopicPartitionKey, int]
    service: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Offsets of a set of groups and of their topics' partitions, taken at ``taken_at`` (seconds on the
    prober's monotonic clock) and ``wall_time`` (epoch seconds, for display)."""

    taken_at: float
    wall_time: float
    groups: tuple[GroupSample, ...]
    ends: Mapping[TopicPartitionKey, int]
    starts: Mapping[TopicPartitionKey, int]

    def partitions_of(self, topic: str) -> list[int]:
        """Every partition of ``topic`` whose end offset was read, in order."""
        return sorted(p for t, p in self.ends if t == topic)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """The lag of one group on one partition."""

    group: str
    topic: str
    partition: int
    committed: int | None
    start: int
    end: int
    lag: int
    rate_per_s: float | None
    drain_s: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "committed": self.committed,
            "start": self.start,
            "end": self.end,
            "lag": self.lag,
            "rate_per_s": _round(self.rate_per_s),
            "drain_s": _round(self.drain_s),
            "drain": drain_text(self.lag, self.drain_s),
        }


@dataclass(frozen=True, slots=True)
class Totals:
    """Lag, rate and drain time added over a set of partitions."""

    lag: int
    rate_per_s: float | None
    drain_s: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "lag": self.lag,
            "rate_per_s": _round(self.rate_per_s),
            "drain_s": _round(self.drain_s),
            "drain": drain_text(self.lag, self.drain_s),
        }


@dataclass(frozen=True, slots=True)
class GroupLag:
    """One consumer group: its state, live members, and lag per partition and per topic."""

    group: str
    service: str | None
    state: str
    members: int
    partitions: tuple[PartitionLag, ...]
    topics: Mapping[str, Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=lambda: Totals(0, None, None))
    lanes: Mapping[str, Totals] = field(default_factory=dict)

    @property
    def lag(self) -> int:
        return self.total.lag

    @property
    def rate_per_s(self) -> float | None:
        return self.total.rate_per_s

    @property
    def drain_s(self) -> float | None:
        return self.total.drain_s

    def as_dict(self) -> dict[str, object]:
        return {
            "group": self.group,
            "service": self.service,
            "state": self.state,
            "members": self.members,
            **self.total.as_dict(),
            "topics": {topic: totals.as_dict() for topic, totals in self.topics.items()},
            **({"lanes": {lane: t.as_dict() for lane, t in self.lanes.items()}} if self.lanes else {}),
            "partitions": [p.as_dict() for p in self.partitions],
        }


@dataclass(frozen=True, slots=True)
class LagReport:
    """Every group's lag at ``wall_time``; ``interval_s`` is the time since the previous sample (None: the
    first sample, so no rates yet)."""

    wall_time: float
    interval_s: float | None
    groups: tuple[GroupLag, ...]

    def group(self, name: str) -> GroupLag | None:
        return next((g for g in self.groups if g.group == name), None)

    @property
    def services(self) -> dict[str, GroupLag]:
        """``{service: its agents' group}`` for the groups that belong to a service (the scaling signal)."""
        return {g.service: g for g in self.groups if g.service is not None}

    def as_dict(self) -> dict[str, object]:
        return {
            "taken_at": round(self.wall_time, 3),
            "interval_s": _round(self.interval_s),
            "groups": [g.as_dict() for g in self.groups],
        }


def lag_document(report: LagReport, prefix: str) -> dict[str, object]:
    """The JSON document of ``aisemble lag --json`` and ``GET /lag``: the report with the topic prefix."""
    return {"prefix": prefix, **report.as_dict()}


def lane_of_topic(topic: str) -> str | None:
    """The lane of a service's request topic: ``interactive`` (``….requests``), ``bulk`` (``….bulk``), else None."""
    if topic.endswith(".requests"):
        return "interactive"
    if topic.endswith(".bulk"):
        return "bulk"
    return None


def resume_position(committed: int | None, start: int) -> int:
    """Where the group resumes on a partition: its committed offset, else (or when below it) the log start."""
    return start if committed is None else max(committed, start)


def partition_lag(committed: int | None, start: int, end: int) -> int:
    """End offset minus where the group resumes (``resume_position``); never < 0."""
    return max(end - resume_position(committed, start), 0)


def rate(previous: int | None, current: int | None, seconds: float | None) -> float | None:
    """Offsets consumed per second between two committed offsets; None when it cannot be known."""
    if previous is None or current is None or seconds is None or seconds <= 0 or current < previous:
        return None
    return (current - previous) / seconds


def drain_time(lag: int, rate_per_s: float | None) -> float | None:
    """Seconds until ``lag`` is consumed at ``rate_per_s``: 0 with no lag, None when not draining."""
    if lag == 0:
        return 0.0
    if rate_per_s is None or rate_per_s <= 0:
        return None
    return lag / rate_per_s


def drain_text(lag: int, drain_s: float | None) -> str:
    """How a person reads a drain time: ``"drained"``, ``"12.3 s"`` or ``"not draining"``."""
    if lag == 0:
        return "drained"
    if drain_s is None:
        return "not draining"
    return f"{drain_s:.1f} s"


def totals(partitions: Iterable[PartitionLag]) -> Totals:
    """Add lags and known rates; the drain time of the sum."""
    parts = list(partitions)
    lag = sum(p.lag for p in parts)
    known = [p.rate_per_s for p in parts if p.rate_per_s is not None]
    total_rate = sum(known) if known else None
    return Totals(lag=lag, rate_per_s=total_rate, drain_s=drain_time(lag, total_rate))


def compute(current: Snapshot, previous: Snapshot | None = None) -> LagReport:
    """The lag report of ``current``, with rates measured since ``previous`` (if any).

    Every partition of every topic listed for a group is reported, including those the group never
    committed on; groups keep the order of ``current.groups``.
    """
    seconds = None if previous is None else current.taken_at - previous.taken_at
    earlier = {} if previous is None else {g.group: g for g in previous.groups}
    groups: list[GroupLag] = []
    for sample in current.groups:
        before = earlier.get(sample.group)
        rows: list[PartitionLag] = []
        for topic in sample.topics:
            for partition in current.partitions_of(topic):
                key = (topic, partition)
                committed = sample.committed.get(key)
                start = current.starts.get(key, 0)
                end = current.ends[key]
                lag = partition_lag(committed, start, end)
                per_s = None
                if before is not None and previous is not None and key in previous.ends:
                    was = resume_position(before.committed.get(key), previous.starts.get(key, 0))
                    per_s = rate(was, resume_position(committed, start), seconds)
                rows.append(PartitionLag(sample.group, topic, partition, committed, start, end, lag, per_s,
                                         drain_time(lag, per_s)))
        by_topic = {topic: totals(r for r in rows if r.topic == topic) for topic in sample.topics}
        lanes = {}
        if sample.service is not None:
            lanes = {lane: totals(r for r in rows if lane_of_topic(r.topic) == lane) for lane in LANES}
        groups.append(
            GroupLag(
                group=sample.group,
                service=sample.service,
                state=sample.state,
                members=sample.members,
                partitions=tuple(rows),
                topics=by_topic,
                total=totals(rows),
                lanes=lanes,
            )
        )
    return LagReport(wall_time=current.wall_time, interval_s=seconds, groups=tuple(groups))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
