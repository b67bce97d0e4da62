"""The Batch API end to end: the official ``openai`` client against a real pipeline (edge + nlp agent, real
Kafka and Redis).

* a batch of 300 mixed embedding lines (294 valid, 6 invalid) completes across an edge SIGKILL: the edge
  is killed mid-batch and restarted with an unreachable Redis (Redis is no part of a batch's state), and
  every ``custom_id`` is answered exactly once in the output and error files, the counts agree with the
  files, and an output body equals what ``POST /v1/embeddings`` answers for the same input;
* a cancelled batch stops, says ``cancelled`` and its counts agree with its files;
* the limits and ownership: 400 naming the field, 404 for unknown ids and for another key's, 403 for a
  service the key may not use;
* the CLI: ``aisemble batch submit --wait`` then ``aisemble batch results``.

Prints ``BATCH-COUNTS:`` (sent / answered / lost) and ``BATCH-RATE:`` (lines/s of the batch).
Chat lines are left out: the LLM agent costs minutes here; chat and completion lines share every code path
but the body renderer (``api.batch_lines.render_reply``, unit-tested).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from aisemble.pipeline import Pipeline, free_port
from streams.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY, OTHER, LLM_ONLY = "batch-key-0123456789", "batch-other-0123456789", "batch-llm-only-0123456789"
EMBED = "/v1/embeddings"


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    keys = [KEY, OTHER, {"key": LLM_ONLY, "services": ["llm"]}]
    p = Pipeline.isolated(
        infra_settings,
        ["nlp", "llm"],
        logs,
        AISEMBLE_API_KEYS=json.dumps(keys),
        AISEMBLE_NLP__THREADS="1",
        AISEMBLE_SESSION_TIMEOUT_S="6",
        AISEMBLE_BATCH__MAX_IN_FLIGHT_LINES="16",
        AISEMBLE_BATCH__CANCEL_GRACE_S="5",
        AISEMBLE_BATCH__PROGRESS_INTERVAL_S="0.2",
    ).start(timeout_s=600)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def client(pipeline: Pipeline) -> OpenAI:
    return OpenAI(base_url=f"{pipeline.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def request_line(custom_id: str, url: str, body: dict[str, object]) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def embed_line(custom_id: str, texts: list[str], **extra: object) -> bytes:
    return request_line(custom_id, EMBED, {"model": "nlp", "input": texts, **extra})


def valid_lines(n: int, tag: str, texts: int = 4) -> dict[str, bytes]:
    return {f"{tag}-{i}": embed_line(f"{tag}-{i}", [f"{tag} sentence {i}.{j} {uuid.uuid4().hex[:6]}"
                                                      for j in range(texts)]) for i in range(n)}  # fmt: skip


def invalid_lines(tag: str) -> tuple[dict[str, bytes], bytes]:
    """Lines the sync route answers 4xx (by custom_id), and one that is no JSON at all."""
    lines = {
        f"{tag}-bad-field": embed_line(f"{tag}-bad-field", ["x"], dimensions=8),
        f"{tag}-bad-model": request_line(f"{tag}-bad-model", EMBED, {"model": "gpt-nope", "input": "x"}),
        f"{tag}-empty": embed_line(f"{tag}-empty", []),
        f"{tag}-bad-url": request_line(f"{tag}-bad-url", "/v1/completions", {"model": "llm", "prompt": "x"}),
        f"{tag}-no-body": json.dumps({"custom_id": f"{tag}-no-body", "method": "POST", "url": EMBED}).encode(),
    }
    return lines, b'{"custom_id": "broken", '


def submit(client: OpenAI, content: bytes, endpoint: str = EMBED) -> str:
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    assert batch.status == "validating" and batch.input_file_id == uploaded.id
    return batch.id


def wait_for(client: OpenAI, batch_id: str, done: object, timeout_s: float) -> openai.types.Batch:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
            if done(batch):  # type: ignore[operator]
                return batch
        except (openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError) as exc:
            if isinstance(exc, openai.NotFoundError):
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} not done within {timeout_s}s")
        time.sleep(0.2)


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, object]]:
    if file_id is None:
        return []
    return [json.loads(raw) for raw in client.files.content(file_id).content.splitlines() if raw.strip()]


def test_a_mixed_batch_answers_every_custom_id_once_across_an_edge_sigkill_and_without_redis(
    pipeline: Pipeline, client: OpenAI
) -> None:
    good = valid_lines(294, "k")
    bad, broken = invalid_lines("k")
    content = b"\n".join([*good.values(), broken, *bad.values()]) + b"\n"
    started = time.monotonic()
    batch_id = submit(client, content)
    at_kill = wait_for(client, batch_id, lambda b: b.request_counts and b.request_counts.completed >= 40, 240)
    assert at_kill.status == "in_progress" and at_kill.request_counts is not None
    assert at_kill.request_counts.completed < len(good), "the batch ended before the kill: nothing was tested"
    pipeline.kill("edge")  # SIGKILL: no leave-group, no commit
    pipeline.proc_env["edge"] = {"AISEMBLE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # no Redis at all
    pipeline.restart("edge")
    pipeline.wait_healthy(120)
    final = wait_for(client, batch_id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"), 300)
    elapsed = time.monotonic() - started
    assert final.status == "completed", final
    output, errors = lines_of(client, final.output_file_id), lines_of(client, final.error_file_id)
    answered = Counter(str(line["custom_id"]) for line in output + errors if line["custom_id"] is not None)
    print("BATCH-COUNTS:", json.dumps({"sent": len(good) + len(bad) + 1, "answered": len(output) + len(errors),
                                       "lost": len(set(good) | set(bad)) - len(answered),
                                       "completed_at_kill": at_kill.request_counts.completed}))  # fmt: skip
    print("BATCH-RATE:", json.dumps({"lines": len(good) + len(bad) + 1, "seconds_incl_kill": round(elapsed, 1)}))
    assert {k for k, n in answered.items() if n > 1} == set(), "a custom_id answered twice"
    assert {str(line["custom_id"]) for line in output} == set(good)
    assert {str(line["custom_id"]) for line in errors if line["custom_id"] is not None} == set(bad)
    assert sum(1 for line in errors if line["custom_id"] is None) == 1  # the line that is no JSON
    assert final.request_counts is not None
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (300, 294, 6)
    for line in output:
        assert line["response"]["status_code"] == 200 and line["error"] is None  # type: ignore[index]
    statuses = {str(line["custom_id"]): (line["response"] or {}).get("status_code") for line in errors}  # type: ignore[attr-defined]
    assert statuses == {"k-bad-field": 400, "k-bad-model": 404, "k-empty": 400, "k-bad-url": None,
                        "k-no-body": 400, "None": None}  # fmt: skip
    # A line's body is what the synchronous route answers for the same input (now from the agents' cache).
    for line in output[:3]:
        request = json.loads(good[str(line["custom_id"])])
        sync = httpx.post(f"{pipeline.url}/v1/embeddings", json=request["body"], headers={"X-API-Key": KEY}, timeout=60)
        assert sync.status_code == 200, sync.text
        assert line["response"]["body"] == sync.json()  # type: ignore[index]


def test_a_cancelled_batch_stops_and_its_counts_agree_with_its_files(pipeline: Pipeline, client: OpenAI) -> None:
    good = valid_lines(200, "c")
    batch_id = submit(client, b"\n".join(good.values()))
    wait_for(client, batch_id, lambda b: b.request_counts and b.request_counts.completed >= 16, 240)
    cancelling = client.batches.cancel(batch_id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    final = wait_for(client, batch_id, lambda b: b.status == "cancelled", 120)
    counts = final.request_counts
    assert counts is not None and counts.total == 200
    assert counts.completed + counts.failed < counts.total, counts  # it stopped
    output, errors = lines_of(client, final.output_file_id), lines_of(client, final.error_file_id)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert final.cancelled_at is not None
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch_id)


def test_limits_and_ownership_in_openais_error_shape(pipeline: Pipeline, client: OpenAI) -> None:
    uploaded = client.files.create(file=("x.jsonl", embed_line("a", ["x"])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as window:
        client.batches.create(input_file_id=uploaded.id, endpoint=EMBED, completion_window="1h")  # type: ignore[arg-type]
    assert window.value.body["param"] == "completion_window"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as endpoint:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/moderations", completion_window="24h")  # type: ignore[arg-type]
    assert endpoint.value.body["param"] == "endpoint"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}"), purpose="assistants")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    other = OpenAI(base_url=f"{pipeline.url}/v1", api_key=OTHER, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=uploaded.id, endpoint=EMBED, completion_window="24h")
    assert uploaded.id not in {f.id for f in other.files.list()}
    assert uploaded.id in {f.id for f in client.files.list()}
    llm_only = OpenAI(base_url=f"{pipeline.url}/v1", api_key=LLM_ONLY, max_retries=0)
    mine = llm_only.files.create(file=("x.jsonl", embed_line("a", ["x"])), purpose="batch")
    with pytest.raises(openai.PermissionDeniedError):
        llm_only.batches.create(input_file_id=mine.id, endpoint=EMBED, completion_window="24h")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_a_chat_batch_answers_each_line_as_the_chat_route_does(pipeline: Pipeline, client: OpenAI) -> None:
    """``/v1/chat/completions`` lines through the llm agent (bulk lane, continuous batching): every line answered
    once, a line the route refuses is its 400, and a line's body is the route's (but for its id and time)."""
    chat = "/v1/chat/completions"
    words = ["red", "blue", "green", "seven"]
    good = {
        f"chat-{w}": request_line(f"chat-{w}", chat, {
            "model": "llm", "messages": [{"role": "user", "content": f"Say the word {w}."}],
            "max_tokens": 4, "temperature": 0,
        })
        for w in words
    }  # fmt: skip
    bad = request_line("chat-bad-role", chat, {"model": "llm", "messages": [{"role": "wizard", "content": "x"}]})
    final = wait_for(client, submit(client, b"\n".join([*good.values(), bad]), chat),
                     lambda b: b.status in ("completed", "failed", "expired", "cancelled"), 300)  # fmt: skip
    assert final.status == "completed" and final.request_counts is not None, final
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (5, 4, 1)
    output, errors = lines_of(client, final.output_file_id), lines_of(client, final.error_file_id)
    assert sorted(str(line["custom_id"]) for line in output) == sorted(good)
    assert [(line["custom_id"], line["response"]["status_code"]) for line in errors] == [("chat-bad-role", 400)]  # type: ignore[index]
    for line in output:
        body = line["response"]["body"]  # type: ignore[index]
        sync = httpx.post(f"{pipeline.url}{chat}", json=json.loads(good[str(line["custom_id"])])["body"],
                          headers={"X-API-Key": KEY}, timeout=120)  # fmt: skip
        assert sync.status_code == 200, sync.text
        expected = sync.json()
        assert body["object"] == expected["object"] == "chat.completion"
        assert body["choices"] == expected["choices"] and body["usage"] == expected["usage"], (body, expected)
        assert body["model"] == expected["model"] and body["choices"][0]["message"]["content"]


def test_the_cli_submits_waits_and_prints_the_results(pipeline: Pipeline, tmp_path: Path) -> None:
    good = valid_lines(20, "cli", texts=1)
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(good.values()) + b"\n")
    common = ["--url", pipeline.url, "--api-key", KEY]
    cli = [sys.executable, "-m", "aisemble", "batch"]
    submitted = subprocess.run([*cli, "submit", str(path), "--endpoint", EMBED, "--wait", *common],
                               capture_output=True, timeout=300, check=False)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr.decode()[-2000:]
    batch_id = submitted.stdout.decode().splitlines()[0]
    assert batch_id.startswith("batch_")
    assert json.loads(submitted.stdout.decode().split("\n", 1)[1])["status"] == "completed"
    results = subprocess.run([*cli, "results", batch_id, *common], capture_output=True, timeout=60, check=False)
    assert results.returncode == 0, results.stderr.decode()[-2000:]
    lines = [json.loads(raw) for raw in results.stdout.decode().splitlines() if raw.strip()]
    assert sorted(line["custom_id"] for line in lines) == sorted(good)


def test_rate_of_a_1000_line_embeddings_batch_and_of_kafka_direct(pipeline: Pipeline, tmp_path: Path) -> None:
    """One run each, same agent, same kind of input (one unique short text a line, so nothing is cached):
    the batch (default ``max_in_flight_lines``) and ``aisemble produce nlp --task embed --bulk --collect``.
    The machine is shared: the figures are indicative. Asserts only that both answered everything."""
    pipeline.kill("edge", signal.SIGTERM)
    pipeline.proc_env["edge"] = {"AISEMBLE_BATCH__MAX_IN_FLIGHT_LINES": "256"}  # the default, Redis as usual
    pipeline.restart("edge")
    pipeline.wait_healthy(120)
    client = OpenAI(base_url=f"{pipeline.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    n = 1000
    good = valid_lines(n, "rate", texts=1)
    started = time.monotonic()
    batch_id = submit(client, b"\n".join(good.values()))
    final = wait_for(client, batch_id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"), 600)
    batch_s = time.monotonic() - started
    assert final.status == "completed" and final.request_counts is not None
    assert final.request_counts.completed == n
    inputs = tmp_path / "inputs.jsonl"
    texts = [{"texts": [f"direct sentence {i} {uuid.uuid4().hex[:6]}"], "normalize": True} for i in range(n)]
    inputs.write_text("\n".join(json.dumps(t) for t in texts) + "\n")
    command = ["produce", "nlp", str(inputs), "--task", "embed", "--bulk", "--collect", "--json"]
    direct = subprocess.run([sys.executable, "-m", "aisemble", *command], capture_output=True, timeout=600,
                            env=pipeline.env, check=False)  # fmt: skip
    assert direct.returncode == 0, direct.stderr.decode()[-2000:]
    summary = json.loads(direct.stdout.decode().strip().splitlines()[-1])
    assert summary["answered"] == n, summary
    direct_figures = {k: summary.get(k) for k in ("throughput_rps", "send_span_s")}
    figures = {"lines": n, "batch_s": round(batch_s, 1), "batch_lines_per_s": round(n / batch_s, 1)}
    print("BATCH-RATE:", json.dumps({**figures, "kafka_direct": direct_figures}))
