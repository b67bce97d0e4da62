"""produce -> record -> replay against the real Kafka and Redis and a real data agent, through the CLI.

2,000 analyze requests are produced at 200/s with ``--collect``, recorded with their replies, replayed at
1x (the send span must follow the recorded span within 10%: the pacing schedule is the feature under test)
and as fast as possible, each with a report and plots, and compared. Figures are printed
(``REPLAY-FIGURES:``), never asserted as speeds. A second test replays into a deployment with no agent:
the run is bounded by ``--timeout`` and counts every request unanswered, and its reply topic is deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from aisemble.pipeline import Pipeline
from streams.recording import RecordedRequest, Recording, read_recording, write_recording
from streams.settings import Settings
from streams.topics import admin_client, ensure_service_topics

pytestmark = pytest.mark.integration

COUNT = 2000
RATE = 200
PNG = b"\x89PNG\r\n\x1a\n"


def _cli(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "aisemble", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"aisemble {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    return done


def _json(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(data, dict)
    return data


async def _topics(settings: Settings, prefix: str) -> list[str]:
    async with admin_client(settings) as admin:
        return [t for t in await admin.list_topics() if t.startswith(prefix)]


def _check_report(directory: Path) -> dict[str, object]:
    report = orjson.loads((directory / "report.json").read_bytes())
    for name in ("latency_over_time.png", "latency_histogram.png", "batch_sizes.png"):
        data = (directory / name).read_bytes()
        assert data[:8] == PNG and len(data) > 1000, name
    latency = report["latency_ms"]
    for hop in ("end_to_end", "queue", "agent", "inference", "reply"):
        assert latency[hop]["count"] == report["answered"], hop
        assert latency[hop]["p50"] is not None
    return report


def test_produce_record_replay_compare(infra_settings: Settings, tmp_path: Path) -> None:
    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path).start()
    env = pipeline.env
    try:
        inputs = tmp_path / "inputs.jsonl"
        inputs.write_bytes(
            b"".join(
                orjson.dumps({"records": [{"id": i, "value": (i * 7) % 97, "tag": f"k{i % 5}"}, {"id": -i}]}) + b"\n"
                for i in range(COUNT)
            )
        )
        produced = _json(_cli(env, "produce", "data", str(inputs), "--task", "analyze", "--rate", str(RATE),
                              "--collect", "--json", timeout=120))
        assert produced["sent"] == COUNT and produced["answered"] == COUNT and produced["errors"] == {}

        rec = tmp_path / "rec.jsonl"
        recorded = _json(_cli(env, "record", "data", "--out", str(rec), "--last", str(COUNT), "--with-replies",
                              "--json", timeout=120))
        assert recorded["recorded"] == COUNT and recorded["with_replies"] == COUNT and recorded["incomplete"] == []
        recording = read_recording(rec)
        assert recording.requests[0].reply is not None and recording.requests[0].reply["ok"] is True
        span = recording.span_s
        # The other windows: offsets per partition (to excluded), and a time window (until excluded).
        by_offset = _json(_cli(env, "record", "data", "--out", str(tmp_path / "o.jsonl"), "--from-offset", "0",
                               "--to-offset", "0:10,1:10,2:10,3:10", "--json", timeout=60))
        assert by_offset["recorded"] == 40
        first = recording.requests[0].timestamp_ms
        by_time = _json(_cli(env, "record", "data", "--out", str(tmp_path / "t.jsonl"), "--since", str(first),
                             "--until", str(first + 2000), "--json", timeout=60))
        assert by_time["recorded"] == sum(1 for r in recording.requests if r.timestamp_ms < first + 2000)

        one_x, fast = tmp_path / "one_x", tmp_path / "max"
        r1 = _json(_cli(env, "replay", str(rec), "--speed", "1", "--report", str(one_x), "--json", timeout=150))
        r2 = _json(_cli(env, "replay", str(rec), "--max", "--report", str(fast), "--json", timeout=150))
        for r in (r1, r2):
            assert (r["sent"], r["answered"], r["unanswered"], r["errors"]) == (COUNT, COUNT, 0, {})
            outputs = r["outputs"]
            assert isinstance(outputs, dict) and outputs["compared"] == COUNT and outputs["differ"] == 0
        # The pacing keeps the recorded timing: first to last send within 10% of the recorded span.
        assert abs(float(r1["send_span_s"]) - span) <= 0.1 * span, (r1["send_span_s"], span)
        report1, report2 = _check_report(one_x), _check_report(fast)

        compared = _cli(env, "replay", "--compare", str(one_x / "report.json"), str(fast / "report.json"),
                        timeout=60).stdout
        assert "throughput rps" in compared and "e2e p95 ms" in compared and "B/A" in compared
        leftover = asyncio.run(_topics(infra_settings, f"{pipeline.prefix}.replies.replay-"))
        assert leftover == []

        def fig(r: dict[str, object]) -> dict[str, object]:
            lat = r["latency_ms"]
            assert isinstance(lat, dict)
            return {
                "send_span_s": r["send_span_s"], "duration_s": r["duration_s"], "throughput_rps": r["throughput_rps"],
                "e2e_p50_ms": lat["end_to_end"]["p50"], "e2e_p95_ms": lat["end_to_end"]["p95"],
                "queue_p50_ms": lat["queue"]["p50"], "batch_mean": r["batch_size"]["mean"],  # type: ignore[index]
            }

        print("REPLAY-FIGURES: " + json.dumps({
            "recorded": COUNT, "recorded_span_s": round(span, 3),
            "produce": {"throughput_rps": produced["throughput_rps"], "e2e_p50_ms":
                        produced["latency_ms"]["end_to_end"]["p50"]},  # type: ignore[index]
            "replay_1x": fig(report1), "replay_max": fig(report2), "report_dir": str(one_x),
        }))
        print("FAULT-COUNTS: " + json.dumps({
            "sent": r1["sent"] + r2["sent"], "answered": r1["answered"] + r2["answered"],  # type: ignore[operator]
            "lost": r1["unanswered"] + r2["unanswered"], "outputs_differ": 0,  # type: ignore[operator]
        }))
        print(compared)
    finally:
        pipeline.stop()


def test_replay_is_bounded_when_nobody_answers(infra_settings: Settings, tmp_path: Path) -> None:
    """A shadow prefix with topics but no agent: every request is sent, none answered, the run ends at
    --timeout, the reply topic is deleted; a missing topic is refused with status 2."""
    prefix = f"shadow{tmp_path.name[-8:].replace('_', '')}".lower()
    shadow = infra_settings.model_copy(update={"topic_prefix": prefix})
    asyncio.run(ensure_service_topics(shadow, ["data"]))
    rec = tmp_path / "rec.jsonl"
    requests = [
        RecordedRequest(0, i, 1_000 + 10 * i, f"o{i}", {"id": f"o{i}", "task": "analyze", "input": {"records": []}})
        for i in range(20)
    ]
    write_recording(rec, Recording("data", "aisemble", "aisemble.data.requests", requests))
    env = {**os.environ, "AISEMBLE_KAFKA_BOOTSTRAP": infra_settings.kafka_bootstrap}
    out = _json(_cli(env, "replay", str(rec), "--prefix", prefix, "--timeout", "3", "--json", timeout=60))
    assert (out["sent"], out["answered"], out["unanswered"]) == (20, 0, 20)
    assert asyncio.run(_topics(infra_settings, f"{prefix}.replies.")) == []
    missing = subprocess.run(
        [sys.executable, "-m", "aisemble", "record", "data", "--out", str(tmp_path / "x.jsonl"), "--last", "5"],
        env={**env, "AISEMBLE_TOPIC_PREFIX": prefix + "-none"}, capture_output=True, text=True, timeout=60,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    print("FAULT-COUNTS: " + json.dumps({"sent": out["sent"], "answered": 0, "unanswered": out["unanswered"],
                                         "lost": 0, "bounded_by_timeout_s": 3}))
