"""Recordings of a request topic: the file format, window arguments and the replay schedule (pure, no Kafka).

A recording is JSON Lines. The first line is a header, every other line one captured request:

```
{"aisemble_recording": 1, "service": "data", "prefix": "aisemble", "topic": "aisemble.data.requests",
 "recorded_at_ms": 1760000000000, "window": {...}, "count": 2000, "replies": 1998, "skipped": 0}
{"partition": 0, "offset": 41, "timestamp_ms": 1760000000123, "key": "7f1c0a",
 "event": {"id": "7f1c0a", "task": "analyze", "input": {...}}, "reply": {"id": "7f1c0a", "ok": true, ...}}
```

``event`` is the request event as it was on the topic (a JSON object); ``reply`` (optional) is the first
reply seen for it (``--with-replies``). Lines are ordered by ``timestamp_ms`` (then partition, offset): the
order a replay sends them in. Unknown header and line fields are ignored, so the format can grow.

Guarantees: ``read_recording`` refuses a file that is not a recording (no header, a line that is not an
object with an ``event`` object) with a :class:`RecordingError` naming the line; ``pacing_schedule`` keeps
the recorded inter-arrival gaps, scaled by ``1/speed`` (or all zero for ``--max``), and never goes
backwards even when timestamps do (clock steps, several producers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

FORMAT_VERSION = 1


class RecordingError(ValueError):
    """A file or an argument that cannot be read as a recording; ``line`` is 1-based (0: not about a line)."""

    def __init__(self, message: str, *, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request event as captured from its topic, with the reply when one was captured."""

    partition: int
    offset: int
    timestamp_ms: int
    key: str | None
    event: dict[str, object]
    reply: dict[str, object] | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "key": self.key,
            "event": self.event,
        }
        if self.reply is not None:
            out["reply"] = self.reply
        return out


@dataclass(frozen=True, slots=True)
class Recording:
    """A header and its requests, in send order."""

    service: str
    prefix: str
    topic: str
    requests: list[RecordedRequest]
    header: dict[str, object] = field(default_factory=dict)

    @property
    def span_s(self) -> float:
        """Seconds from the first to the last recorded timestamp (0 for fewer than two)."""
        if len(self.requests) < 2:
            return 0.0
        stamps = [r.timestamp_ms for r in self.requests]
        return (max(stamps) - min(stamps)) / 1000.0

    @property
    def with_replies(self) -> int:
        return sum(1 for r in self.requests if r.reply is not None)


def order(requests: Iterable[RecordedRequest]) -> list[RecordedRequest]:
    """Requests in send order: by timestamp, then partition and offset."""
    return sorted(requests, key=lambda r: (r.timestamp_ms, r.partition, r.offset))


def write_recording(path: Path, recording: Recording) -> None:
    """Write ``recording`` (header first, requests in send order); the file is replaced whole."""
    header: dict[str, object] = {
        **recording.header,
        "aisemble_recording": FORMAT_VERSION,
        "service": recording.service,
        "prefix": recording.prefix,
        "topic": recording.topic,
        "count": len(recording.requests),
        "replies": recording.with_replies,
    }
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(orjson.dumps(header) + b"\n")
        for request in order(recording.requests):
            out.write(orjson.dumps(request.to_json()) + b"\n")
    tmp.replace(path)


def json_objects(lines: Iterable[bytes], where: str = "line ") -> Iterator[tuple[int, dict[str, object]]]:
    """``(line number, object)`` for each non-blank JSON-object line; ``where`` prefixes the line number in
    errors (e.g. ``"rec.jsonl:"``).

    Raises:
        RecordingError: a line that is not JSON, or not a JSON object (named by number).
    """
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RecordingError(f"{where}{number}: not JSON: {exc}", line=number) from exc
        if not isinstance(data, dict):
            raise RecordingError(f"{where}{number}: not a JSON object", line=number)
        yield number, data


def read_recording(path: Path) -> Recording:
    """Read a recording written by ``write_recording`` (or by hand in the same format).

    Raises:
        RecordingError: no header, or a line that is not JSON or has no ``event`` object (named by number).
    """
    header: dict[str, object] | None = None
    requests: list[RecordedRequest] = []
    with path.open("rb") as file:
        for number, data in json_objects(file, f"{path}:"):
            if header is None:
                if data.get("aisemble_recording") != FORMAT_VERSION:
                    raise RecordingError(
                        f"{path}:{number}: not an aisemble recording (no header with aisemble_recording: 1)",
                        line=number,
                    )
                header = data
                continue
            requests.append(_request(data, f"{path}:{number}", number))
    if header is None:
        raise RecordingError(f"{path}: empty file, not a recording")
    return Recording(
        service=str(header.get("service", "")),
        prefix=str(header.get("prefix", "")),
        topic=str(header.get("topic", "")),
        requests=order(requests),
        header=header,
    )


def _request(data: dict[str, object], where: str, number: int) -> RecordedRequest:
    event, reply = data.get("event"), data.get("reply")
    if not isinstance(event, dict):
        raise RecordingError(f"{where}: no 'event' object", line=number)
    if reply is not None and not isinstance(reply, dict):
        raise RecordingError(f"{where}: 'reply' is not an object", line=number)
    try:
        partition, offset, ts = (int(data.get(k, 0)) for k in ("partition", "offset", "timestamp_ms"))  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise RecordingError(f"{where}: partition, offset and timestamp_ms must be integers", line=number) from exc
    key = data.get("key")
    return RecordedRequest(partition, offset, ts, None if key is None else str(key), event, reply)


def pacing_schedule(timestamps_ms: Sequence[int], speed: float | None) -> list[float]:
    """Send offsets in seconds from the replay's start, one per timestamp (in send order).

    ``speed`` scales the recorded gaps (2.0 = twice as fast); ``None`` means as fast as possible (all 0).
    A timestamp earlier than its predecessor keeps the predecessor's offset: the schedule never goes back.
    """
    if speed is not None and speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    if not timestamps_ms or speed is None:
        return [0.0] * len(timestamps_ms)
    first = timestamps_ms[0]
    out: list[float] = []
    last = 0.0
    for ts in timestamps_ms:
        last = max(last, (ts - first) / 1000.0 / speed)
        out.append(last)
    return out


def uniform_schedule(count: int, rate: float | None) -> list[float]:
    """Send offsets for ``count`` events at ``rate`` per second (``None``: as fast as possible)."""
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return [0.0 if rate is None else i / rate for i in range(count)]


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_time(text: str, now_ms: int) -> int:
    """A ``--since``/``--until`` argument as epoch milliseconds.

    Accepts epoch milliseconds (``1760000000000``), ISO 8601 (``2025-10-09T12:00:00``, UTC unless it names a
    zone, e.g. ``+02:00`` or ``Z``) or a duration ago (``90s``, ``15m``, ``2h``, ``1d``, ``500ms``).

    Raises:
        RecordingError: none of these.
    """
    value = text.strip()
    if value.isdigit():
        return int(value)
    match = _RELATIVE.match(value)
    if match:
        return now_ms - int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise RecordingError(
            f"cannot read time {text!r}: use epoch ms, ISO 8601 (2025-10-09T12:00:00Z) or a duration ago (15m)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_offsets(text: str) -> dict[int, int] | int:
    """A ``--from-offset``/``--to-offset`` argument: one offset for every partition (``100``) or per
    partition (``0:100,1:250``; partitions not named keep the topic's start or end).

    Raises:
        RecordingError: not of either form, or a negative offset.
    """
    value = text.strip()
    if value.isdigit():
        return int(value)
    out: dict[int, int] = {}
    for part in value.split(","):
        partition, sep, offset = part.strip().partition(":")
        if not sep or not partition.strip().isdigit() or not offset.strip().isdigit():
            raise RecordingError(f"cannot read offsets {text!r}: use N for every partition, or P:N,P:N")
        out[int(partition)] = int(offset)
    return out


def offsets_for(
    spec: dict[int, int] | int | None, partitions: Iterable[int], default: dict[int, int]
) -> dict[int, int]:
    """Per-partition offsets from a parsed spec, ``default[p]`` where the spec says nothing."""
    if spec is None:
        return {p: default[p] for p in partitions}
    if isinstance(spec, int):
        return {p: spec for p in partitions}
    return {p: spec.get(p, default[p]) for p in partitions}


def last_n_start(begin: dict[int, int], end: dict[int, int], n: int) -> dict[int, int]:
    """Start offsets that read at most ``n`` records per partition before ``end`` (the last ``n`` of the
    whole topic are among them; the caller keeps the ``n`` latest by timestamp)."""
    return {p: max(begin[p], end[p] - n) for p in end}
