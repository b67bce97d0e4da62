"""Hostile events straight onto every service's request topic: every one is accounted for.

Random bytes of many sizes up to the broker's limit, invalid UTF-8, JSON that is not an object, envelopes
with wrong types or no id, tombstones, unknown tasks and huge inputs, interleaved with valid requests.
Each event is tracked by the partition and offset the broker gave it: an unreadable one must land on the
service's DLQ (its ``source`` names that offset) and a readable one must be answered on our reply topic.
Nothing is lost, no agent dies, and the valid requests among them are answered ``ok``; every unknown task is
answered ``unknown_task`` and every huge input the code its service gives it (``HUGE_ANSWER``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from aisemble.pipeline import Pipeline
from schemas import ErrorCode
from streams.settings import Settings
from tests.kafka_client import RawClient

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.slow]

SIZES = [0, 1, 2, 7, 100, 1000, 4096, 65_536, 300_000, 1_000_000]

IMAGE_B64 = base64.b64encode((Path(__file__).parent / "data" / "astronaut.jpg").read_bytes()).decode()
HUGE = "x" * 900_000
# What a huge (900 KB) input is answered, per service: text and prompts past the schema's MAX_TEXT_CHARS /
# MAX_PROMPT_CHARS and an image that is not one are invalid_input; one record with a long string is analysed.
HUGE_ANSWER = {
    "data": "ok",
    "nlp": ErrorCode.INVALID_INPUT.value,
    "llm": ErrorCode.INVALID_INPUT.value,
    "vision": ErrorCode.INVALID_INPUT.value,
}
VALID: dict[str, tuple[str, dict[str, object], dict[str, object]]] = {  # task, valid input, huge input
    "data": ("analyze", {"records": [{"v": 1}, {"v": 3}]}, {"records": [{"x": HUGE}]}),
    "nlp": ("sentiment", {"text": "I love it."}, {"text": HUGE}),
    "llm": ("completion", {"prompt": "Hi", "max_tokens": 2, "temperature": 0}, {"prompt": HUGE, "max_tokens": 1}),
    "vision": ("detect_faces", {"image_b64": IMAGE_B64}, {"image_b64": HUGE}),
}


def _hostile(rng: random.Random, reply_to: str, service: str, n: int) -> list[tuple[bytes | None, str | None, bool]]:
    """``n`` events as (value, id expected in a reply or None when it must be dead-lettered, is valid)."""
    task, valid_input, huge_input = VALID[service]
    out: list[tuple[bytes | None, str | None, bool]] = []
    kinds = ["random", "utf8", "nonobject", "types", "noid", "tombstone", "unknown_task", "huge", "valid", "valid"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        rid = f"{'t' if kind == 'unknown_task' else 'h' if kind == 'huge' else 'f'}{i}-{uuid.uuid4().hex[:8]}"
        if kind == "random":
            out.append((os.urandom(SIZES[(i // len(kinds)) % len(SIZES)]), None, False))
        elif kind == "utf8":
            out.append((b"\xff\xfe" + orjson.dumps({"id": rid, "task": task, "input": valid_input}), None, False))
        elif kind == "nonobject":
            out.append((rng.choice([b"[1,2]", b"42", b'"s"', b"null", b"{", b"true"]), None, False))
        elif kind == "types":
            bad = rng.choice(
                [
                    {"id": 5, "task": task, "input": valid_input},
                    {"id": rid, "task": 7, "input": valid_input},
                    {"id": rid, "task": task, "input": "text"},
                    {"id": rid, "task": task, "input": valid_input, "deadline_ms": "soon"},
                    {"id": rid, "task": task, "input": valid_input, "reply_to": "not a topic!"},
                    {"id": "", "task": task, "input": valid_input},
                ]
            )
            out.append((orjson.dumps({**bad, "reply_to": bad.get("reply_to", reply_to)}), None, False))
        elif kind == "noid":
            out.append((orjson.dumps({"task": task, "input": valid_input, "reply_to": reply_to}), None, False))
        elif kind == "tombstone":
            out.append((None, None, False))
        elif kind == "unknown_task":
            out.append((orjson.dumps({"id": rid, "task": "nope", "input": {}, "reply_to": reply_to}), rid, False))
        elif kind == "huge":
            event = {"id": rid, "task": task, "input": huge_input, "reply_to": reply_to, "cache": False}
            out.append((orjson.dumps(event), rid, False))
        else:
            event = {"id": rid, "task": task, "input": valid_input, "reply_to": reply_to, "cache": False}
            out.append((orjson.dumps(event), rid, True))
    return out


async def test_hostile_events_on_every_request_topic_are_all_accounted_for(
    infra_settings: Settings, tmp_path: Path
) -> None:
    counts_per_service = {"data": 2000, "nlp": 300, "vision": 300, "llm": 200}
    pipeline = Pipeline.isolated(infra_settings, list(counts_per_service), tmp_path).start()
    rng = random.Random(7)
    producer = AIOKafkaProducer(
        bootstrap_servers=pipeline.settings.kafka_bootstrap, acks="all", max_request_size=1_100_000
    )
    await producer.start()
    try:
        async with RawClient(pipeline.settings) as client:
            expect_reply: dict[str, str] = {}
            kind_of: dict[str, str] = {}  # rid -> "unknown_task" | "huge" for the replies whose code is asserted
            expect_dlq: dict[str, set[tuple[int, int]]] = {}
            valid_ids: set[str] = set()
            for service, n in counts_per_service.items():
                topic = f"{pipeline.prefix}.{service}.requests"
                events = _hostile(rng, client.reply_topic, service, n)
                futures = [await producer.send(topic, e[0], key=f"k{i}".encode()) for i, e in enumerate(events)]
                metas = await asyncio.gather(*futures)
                expect_dlq[service] = set()
                for (_, rid, valid), meta in zip(events, metas, strict=True):
                    if rid is None:
                        expect_dlq[service].add((meta.partition, meta.offset))
                    else:
                        expect_reply[rid] = service
                        if valid:
                            valid_ids.add(rid)
                        elif rid.startswith(("t", "h")):
                            kind_of[rid] = "unknown_task" if rid.startswith("t") else "huge"
            replies = await client.read(client.reply_topic, len(expect_reply), timeout_s=300, distinct="id")
            letters = {
                s: await client.read(f"{pipeline.prefix}.{s}.dlq", len(expect_dlq[s]), timeout_s=120)
                for s in counts_per_service
            }
        answered = {r["id"] for r in replies}
        counts: dict[str, object] = {"test": "kafka_fuzz", "sent": sum(counts_per_service.values())}
        lost_total = len(set(expect_reply) - answered)
        for service in counts_per_service:
            got = {(letter["source"]["partition"], letter["source"]["offset"]) for letter in letters[service]}
            missing = expect_dlq[service] - got
            lost_total += len(missing)
            counts[f"{service}_dead_lettered"] = len(got & expect_dlq[service])
        counts["answered"] = len(answered & set(expect_reply))
        counts["valid_ok"] = sum(1 for r in replies if r["id"] in valid_ids and r["ok"])
        counts["valid_sent"] = len(valid_ids)
        counts["lost"] = lost_total
        codes: dict[str, Counter[str]] = {}  # "service/kind" -> reply codes ("ok" for a success)
        for r in replies:
            rid = str(r["id"])
            if rid in kind_of:
                error = r.get("error")
                code = "ok" if r["ok"] else str(error["code"]) if isinstance(error, dict) else "no error"
                codes.setdefault(f"{expect_reply[rid]}/{kind_of[rid]}", Counter())[code] += 1
        counts["codes"] = {k: dict(v) for k, v in sorted(codes.items())}
        print("FAULT-COUNTS:", json.dumps(counts))
        assert lost_total == 0
        expected = {f"{s}/unknown_task": ErrorCode.UNKNOWN_TASK.value for s in counts_per_service} | {
            f"{s}/huge": code for s, code in HUGE_ANSWER.items()
        }
        assert {k: set(v) for k, v in codes.items()} == {k: {v} for k, v in expected.items()}, counts["codes"]
        assert counts["valid_ok"] == len(valid_ids), "a valid request among the hostile ones was not served"
        assert all(letter["error"]["code"] for ls in letters.values() for letter in ls)
        assert pipeline.exited() == {}, "an agent died"
    finally:
        await producer.stop()
        pipeline.stop()
