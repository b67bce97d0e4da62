"""Pure parts of the traffic tools: pacing, time and offset arguments, the recording file, statistics,
output comparison, report comparison and plots. No Kafka."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from streams.recorder import Window
from streams.recording import (
    RecordedRequest,
    Recording,
    RecordingError,
    last_n_start,
    offsets_for,
    pacing_schedule,
    parse_offsets,
    parse_time,
    read_recording,
    uniform_schedule,
    write_recording,
)
from streams.replay import events_from_lines, replay_events
from streams.replay_report import (
    Sample,
    build_report,
    compare_outputs,
    compare_rows,
    cosine_distance,
    hops,
    output_comparison,
    write_report,
)


def test_pacing_keeps_gaps_scaled_and_never_goes_back() -> None:
    ts = [1000, 1100, 1600, 1500, 3000]
    assert pacing_schedule(ts, 1.0) == [0.0, 0.1, 0.6, 0.6, 2.0]
    assert pacing_schedule(ts, 2.0) == [0.0, 0.05, 0.3, 0.3, 1.0]
    assert pacing_schedule(ts, None) == [0.0] * 5
    assert pacing_schedule([], 1.0) == []
    with pytest.raises(ValueError):
        pacing_schedule(ts, 0)
    assert uniform_schedule(3, 10) == [0.0, 0.1, 0.2]
    assert uniform_schedule(2, None) == [0.0, 0.0]


def test_parse_time_forms() -> None:
    now = 1_760_000_000_000
    assert parse_time("1759999999000", now) == 1_759_999_999_000
    assert parse_time("15m", now) == now - 15 * 60_000
    assert parse_time("500ms", now) == now - 500
    assert parse_time("1.5h", now) == now - 5_400_000
    assert parse_time("2025-10-09T12:00:00Z", now) == 1_760_011_200_000
    assert parse_time("2025-10-09T12:00:00", now) == 1_760_011_200_000  # UTC unless zoned
    assert parse_time("2025-10-09T14:00:00+02:00", now) == 1_760_011_200_000
    with pytest.raises(RecordingError):
        parse_time("yesterday", now)


def test_parse_offsets_and_windows() -> None:
    assert parse_offsets("100") == 100
    assert parse_offsets("0:10, 2:30") == {0: 10, 2: 30}
    with pytest.raises(RecordingError):
        parse_offsets("0=10")
    begin, end = {0: 0, 1: 5, 2: 0}, {0: 100, 1: 8, 2: 0}
    assert offsets_for({0: 10}, [0, 1, 2], begin) == {0: 10, 1: 5, 2: 0}
    assert offsets_for(7, [0, 1], begin) == {0: 7, 1: 7}
    assert offsets_for(None, [0, 1], end) == {0: 100, 1: 8}
    assert last_n_start(begin, end, 10) == {0: 90, 1: 5, 2: 0}
    window = Window(from_offsets=0, to_offsets={0: 10, 3: 4})
    assert orjson.loads(orjson.dumps(window.describe())) == {"from_offset": 0, "to_offset": {"0": 10, "3": 4}}


def _recording(tmp_path: Path) -> Path:
    requests = [
        RecordedRequest(1, 7, 2000, "b", {"id": "b", "task": "analyze", "input": {"records": []}}),
        RecordedRequest(0, 3, 1000, "a", {"id": "a", "task": "analyze", "input": {"records": []}},
                        {"id": "a", "ok": True, "output": {"count": 0}}),
    ]
    path = tmp_path / "rec.jsonl"
    write_recording(path, Recording("data", "aisemble", "aisemble.data.requests", requests, {"window": {"last": 2}}))
    return path


def test_recording_round_trip_in_send_order(tmp_path: Path) -> None:
    path = _recording(tmp_path)
    lines = path.read_bytes().splitlines()
    header = orjson.loads(lines[0])
    assert header["aisemble_recording"] == 1 and header["count"] == 2 and header["replies"] == 1
    assert header["window"] == {"last": 2}
    assert orjson.loads(lines[1])["offset"] == 3  # earliest timestamp first
    rec = read_recording(path)
    assert [r.event["id"] for r in rec.requests] == ["a", "b"]
    assert rec.requests[0].reply == {"id": "a", "ok": True, "output": {"count": 0}}
    assert rec.span_s == 1.0 and rec.with_replies == 1 and rec.service == "data"


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b'{"id": 1}\n', 1),  # no header
        (b'{"aisemble_recording": 1}\nnot json\n', 2),
        (b'{"aisemble_recording": 1}\n{"partition": 0}\n', 2),  # no event
        (b'{"aisemble_recording": 1}\n{"event": {}, "offset": "x"}\n', 2),
    ],
)
def test_bad_recordings_name_the_line(tmp_path: Path, content: bytes, line: int) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(RecordingError) as info:
        read_recording(path)
    assert info.value.line == line


def test_events_from_lines_and_replay_events(tmp_path: Path) -> None:
    out = events_from_lines([b'{"records": [{"v": 1}]}', b"", b'{"records": []}'], "analyze", "run1")
    assert [o.event for o in out] == [
        {"id": "prun1-0", "task": "analyze", "input": {"records": [{"v": 1}]}},
        {"id": "prun1-1", "task": "analyze", "input": {"records": []}},
    ]
    whole = events_from_lines([b'{"id": "x", "task": "analyze", "input": {}}'], None, "r")
    assert whole[0].id == "x"
    with pytest.raises(RecordingError):
        events_from_lines([b'{"task": "analyze"}'], None, "r")
    with pytest.raises(RecordingError):
        events_from_lines([b"[1]"], "analyze", "r")
    rec = read_recording(_recording(tmp_path))
    rec.requests[0].event["deadline_ms"] = 1500  # 500 ms after its timestamp
    events = replay_events(rec, "abc", "p.replies.replay-abc", keep_cache=False)
    assert [(e.id, e.original_id) for e in events] == [("rabc-0", "a"), ("rabc-1", "b")]
    assert events[0].event["reply_to"] == "p.replies.replay-abc" and events[0].event["cache"] is False
    assert events[0].deadline_budget_ms == 500 and "deadline_ms" not in events[0].event
    assert "cache" not in replay_events(rec, "abc", "t", keep_cache=True)[1].event


def _sample(i: int, sent: float, received: float | None, reply: dict[str, object] | None) -> Sample:
    return Sample(i, f"r-{i}", f"o-{i}", 0.0, sent, None, received, reply)


def test_hops_and_report_counts() -> None:
    ok = {"ok": True, "timings_ms": {"queue_ms": 5.0, "inference_ms": 2.0, "total_ms": 3.0, "batch_size": 4}}
    cached = {"ok": True, "cached": True, "timings_ms": {"queue_ms": 1.0, "batch_size": 1}}
    bad = {"ok": False, "error": {"code": "invalid_input", "message": "x"}, "timings_ms": {}}
    samples = [
        _sample(0, 1000.0, 1010.0, ok),
        _sample(1, 1100.0, 1104.0, cached),
        _sample(2, 1200.0, 1300.0, bad),
        _sample(3, 1300.0, None, None),
        Sample(4, "r-4", "o-4", 0.0, 0.0, "KafkaTimeoutError"),
    ]
    assert hops(samples[0]) == {"end_to_end": 10.0, "queue": 5.0, "agent": 3.0, "inference": 2.0, "reply": 2.0}
    assert hops(samples[1])["reply"] == 3.0 and "agent" not in hops(samples[1])
    report = build_report(samples, meta={"mode": "1x"})
    assert (report["count"], report["sent"], report["answered"], report["unanswered"]) == (5, 4, 3, 1)
    assert report["errors"] == {"invalid_input": 1} and report["send_errors"] == {"KafkaTimeoutError": 1}
    assert report["ok"] == 2 and report["cached"] == 1
    assert report["send_span_s"] == 0.3 and report["duration_s"] == 0.3
    assert report["throughput_rps"] == 10.0
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    assert latency["end_to_end"]["count"] == 3 and latency["end_to_end"]["max"] == 100.0
    assert latency["inference"]["count"] == 1
    assert report["batch_size"]["max"] == 4  # type: ignore[index]


def test_output_comparison_rules() -> None:
    ev = {"task": "analyze"}
    a = {"ok": True, "output": {"count": 2, "fields": {"x": 1}}}
    assert not compare_outputs("data", ev, a, {"ok": True, "output": {"fields": {"x": 1}, "count": 2}}).differ
    assert compare_outputs("data", ev, a, {"ok": True, "output": {"count": 3}}).differ
    assert compare_outputs("data", ev, a, {"ok": False, "error": {"code": "internal"}}).differ
    err = {"ok": False, "error": {"code": "invalid_input"}}
    assert not compare_outputs("data", ev, err, err).differ
    emb = {"task": "embed"}
    v1 = {"ok": True, "output": {"vector": [1.0, 0.0], "dim": 2}}
    v2 = {"ok": True, "output": {"vector": [1.0, 0.001], "dim": 2}}
    v3 = {"ok": True, "output": {"vector": [0.0, 1.0], "dim": 2}}
    near = compare_outputs("nlp", emb, v1, v2)
    assert near.method == "cosine" and not near.differ and near.distance is not None
    assert compare_outputs("nlp", emb, v1, v3).differ
    many = {"ok": True, "output": {"results": [{"vector": [1.0, 0.0]}, {"vector": [0.0, 1.0]}]}}
    assert not compare_outputs("nlp", emb, many, many).differ
    sent = {"task": "sentiment"}
    pos = {"ok": True, "output": {"label": "positive", "score": 0.9}}
    assert not compare_outputs("nlp", sent, pos, {"ok": True, "output": {"label": "positive", "score": 0.7}}).differ
    assert compare_outputs("nlp", sent, pos, {"ok": True, "output": {"label": "negative", "score": 0.7}}).differ
    top = {"ok": True, "output": {"labels": [{"label": "cat", "score": 0.6}]}}
    assert not compare_outputs("vision", {"task": "classify"}, top, top).differ
    sampled = {"task": "completion", "input": {"prompt": "x", "temperature": 0.7}}
    assert compare_outputs("llm", sampled, {"ok": True}, {"ok": False}).method == "skip"
    greedy = {"task": "completion", "input": {"prompt": "x", "temperature": 0}}
    text_a, text_b = {"ok": True, "output": {"text": "a"}}, {"ok": True, "output": {"text": "b"}}
    assert compare_outputs("llm", greedy, text_a, text_b).differ
    summary = output_comparison("nlp", [(emb, v1, v2), (emb, v1, v3), (sent, pos, pos)])
    assert summary["compared"] == 3 and summary["differ"] == 1
    assert summary["methods"] == {"cosine": 2, "label": 1}
    assert cosine_distance([1.0], [1.0, 2.0]) == 1.0


def test_compare_rows_ratios() -> None:
    a = {"sent": 100, "throughput_rps": 50.0, "latency_ms": {"end_to_end": {"p50": 10.0}}, "errors": {"x": 2}}
    b = {"sent": 100, "throughput_rps": 100.0, "latency_ms": {"end_to_end": {"p50": 5.0}}, "errors": {}}
    rows = {r[0]: r for r in compare_rows(a, b)}
    assert rows["throughput rps"][1:] == ("50.0", "100.0", "2.00x")
    assert rows["e2e p50 ms"][3] == "0.50x"
    assert rows["errors"][1:3] == ("2", "0")
    assert rows["e2e p99 ms"][1:] == ("-", "-", "")


def test_write_report_writes_json_and_pngs(tmp_path: Path) -> None:
    ok = {"ok": True, "timings_ms": {"queue_ms": 5.0, "inference_ms": 2.0, "total_ms": 3.0, "batch_size": 2}}
    samples = [_sample(i, 1000.0 + i, 1010.0 + 2 * i, ok) for i in range(50)]
    report = build_report(samples, meta={"title": "unit"})
    paths = write_report(tmp_path / "out", report, samples)
    assert orjson.loads((tmp_path / "out" / "report.json").read_bytes())["answered"] == 50
    assert len((tmp_path / "out" / "samples.jsonl").read_bytes().splitlines()) == 50
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = write_report(tmp_path / "empty", build_report([], meta={}), [])
    assert all(p.stat().st_size > 0 for p in empty[2:])  # plots say "no replies"
