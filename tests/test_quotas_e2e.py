"""Per-key quotas against real pipelines (real Kafka and Redis; the official ``openai`` client on /v1).

One pipeline (llm + data agents) with one key per quota: rpm gives its 429 with ``Retry-After`` and OpenAI's
headers counting down; tpm refuses what does not fit and corrects its charge by the reply's usage; a second
concurrent request of a ``max_in_flight=1`` key is 429 until the first has answered; a key limited to
``["nlp"]`` is 403 elsewhere; a plain-string key is unlimited and gets no ``x-ratelimit`` headers; ``/metrics``
and ``/status.json`` count per key name and never show a key. A second pipeline (data agent, its OWN Redis, two
edges) shares one key's rpm across both edges, then, with that Redis stopped by PID, each edge enforces the
limits alone, every answer within a bounded time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

import infra
from aisemble.pipeline import Pipeline, free_port
from api.quotas import estimate_tokens
from streams.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RPM_KEY = "quota-rpm-key-0123456789abcdef"
TPM_KEY = "quota-tpm-key-0123456789abcdef"
FLIGHT_KEY = "quota-flight-key-0123456789abcdef"
NLP_KEY = "quota-nlp-only-key-0123456789abcdef"
PLAIN_KEY = "quota-plain-key-0123456789abcdef"
TPM = 300
KEYS = [
    {"key": RPM_KEY, "name": "rpm-team", "rpm": 5},
    {"key": TPM_KEY, "name": "tpm-team", "tpm": TPM},
    {"key": FLIGHT_KEY, "name": "flight-team", "max_in_flight": 1},
    {"key": NLP_KEY, "name": "nlp-team", "rpm": 100, "services": ["nlp"]},
    PLAIN_KEY,
]
HI = [{"role": "user", "content": "Say hi."}]
RECORDS = {"operation": "analyze", "data": {"records": [{"id": 1, "value": 10}]}, "cache": False}
ANSWER_BOUND_S = 10.0  # no answer may take longer than this while Redis is away (measured: well under 1 s)


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    p = Pipeline.isolated(
        infra_settings,
        ["llm", "data"],
        Path(tmp_path_factory.mktemp("logs")),
        AISEMBLE_REQUEST_TIMEOUT_S="120",
        AISEMBLE_API_KEYS=json.dumps(KEYS),
        AISEMBLE_LLM__THREADS="1",
    ).start(timeout_s=600)
    yield p
    p.stop()


def _client(pipeline: Pipeline, key: str) -> OpenAI:
    return OpenAI(base_url=f"{pipeline.url}/v1", api_key=key, max_retries=0, timeout=180)


def _limits(headers: httpx.Headers, kind: str) -> tuple[int, int, str]:
    return (
        int(headers[f"x-ratelimit-limit-{kind}"]),
        int(headers[f"x-ratelimit-remaining-{kind}"]),
        headers[f"x-ratelimit-reset-{kind}"],
    )


def test_rpm_gives_its_answers_then_429_with_retry_after_and_headers(pipeline: Pipeline) -> None:
    client = _client(pipeline, RPM_KEY)
    remaining = []
    for _ in range(5):
        raw = client.chat.completions.with_raw_response.create(model="llm", messages=HI, max_tokens=1, temperature=0)
        assert raw.http_response.status_code == 200
        limit, left, reset = _limits(raw.headers, "requests")
        assert limit == 5 and reset.endswith("s")
        remaining.append(left)
        assert "x-ratelimit-limit-tokens" not in raw.headers  # this key has no tpm
    assert remaining == [4, 3, 2, 1, 0]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="llm", messages=HI, max_tokens=1, temperature=0)
    response = info.value.response
    assert response.status_code == 429 and 1 <= int(response.headers["retry-after"]) <= 120
    assert _limits(response.headers, "requests")[:2] == (5, 0)
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded") and "rpm-team" in error["message"]


def test_tpm_refuses_what_does_not_fit_and_corrects_by_usage(pipeline: Pipeline) -> None:
    client = _client(pipeline, TPM_KEY)
    raw = client.chat.completions.with_raw_response.create(model="llm", messages=HI, max_tokens=48, temperature=0)
    usage = raw.parse().usage
    assert usage is not None and usage.total_tokens > 0
    limit, left, _ = _limits(raw.headers, "tokens")
    charged = estimate_tokens({"messages": HI, "max_tokens": 48})
    assert charged != usage.total_tokens  # so the header tells a corrected charge from an uncorrected one
    assert (limit, left) == (TPM, TPM - usage.total_tokens)  # corrected by the reply's usage, not the estimate
    # more than remains: 429 on tokens; more than the whole tpm: 400 naming the problem (no wait would help)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="llm", messages=HI, max_tokens=left, temperature=0)
    assert info.value.response.json()["error"]["type"] == "tokens"
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert _limits(info.value.response.headers, "tokens")[1] == left  # the refused request took nothing
    with pytest.raises(openai.BadRequestError) as too_big:
        client.chat.completions.create(model="llm", messages=HI, max_tokens=TPM + 1)
    assert too_big.value.code == "request_too_large" and str(TPM) in too_big.value.message


def test_max_in_flight_refuses_a_second_concurrent_request_until_the_first_answers(pipeline: Pipeline) -> None:
    client = _client(pipeline, FLIGHT_KEY)
    stream = client.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "Count from one to ten."}], max_tokens=24, stream=True
    )  # the headers came: the stream holds the key's one slot until it ends
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="llm", messages=HI, max_tokens=1)
        assert "concurrent" in info.value.message and info.value.response.headers["retry-after"] == "1"
    finally:
        text = "".join((chunk.choices[0].delta.content or "") for chunk in stream if chunk.choices)
        stream.close()
    assert text
    deadline = time.monotonic() + 5  # the slot is given back once the stream's response has ended
    while True:
        try:
            reply = client.chat.completions.create(model="llm", messages=HI, max_tokens=1)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the slot was not given back after the stream ended"
            time.sleep(0.1)
    assert reply.choices


def test_a_key_limited_to_nlp_is_forbidden_elsewhere(pipeline: Pipeline) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        _client(pipeline, NLP_KEY).chat.completions.create(model="llm", messages=HI, max_tokens=1)
    assert info.value.code == "service_not_allowed" and "'llm'" in info.value.message
    with httpx.Client(base_url=pipeline.url, timeout=30, headers={"X-API-Key": NLP_KEY}) as http:
        vision = http.post("/ai/vision/analyze", json={"task": "describe", "image_b64": "aGk="})
        data = http.post("/data/process", json=RECORDS)
    assert vision.status_code == 403 and vision.json()["error"]["code"] == "forbidden"
    assert "'vision'" in vision.json()["error"]["message"]
    assert data.status_code == 403
    assert _limits(vision.headers, "requests")[:2] == (100, 100)  # a refused request takes nothing


def test_plain_string_keys_are_unlimited_and_carry_no_ratelimit_headers(pipeline: Pipeline) -> None:
    client = _client(pipeline, PLAIN_KEY)
    for _ in range(7):  # more than any limit above
        raw = client.chat.completions.with_raw_response.create(model="llm", messages=HI, max_tokens=1, temperature=0)
        assert raw.http_response.status_code == 200
        assert not [h for h in raw.headers if h.startswith("x-ratelimit")]


def test_metrics_and_status_count_per_key_name_and_never_show_a_key(pipeline: Pipeline) -> None:
    with httpx.Client(base_url=pipeline.url, timeout=30, headers={"X-API-Key": PLAIN_KEY}) as http:
        http.post("/data/process", json=RECORDS, headers={"X-API-Key": RPM_KEY})  # one more 429 for rpm-team
        metrics = http.get("/metrics").text
        status = http.get("/status.json")
    assert status.status_code == 200
    for key in (RPM_KEY, TPM_KEY, FLIGHT_KEY, NLP_KEY, PLAIN_KEY):
        assert key not in metrics and key not in status.text
    keys = status.json()["keys"]
    assert set(keys) == {"rpm-team", "tpm-team", "flight-team", "nlp-team", "key-4"}
    assert keys["rpm-team"]["by_service"] == {"llm": 5} and keys["rpm-team"]["by_limit"] == {"rpm": 2}
    assert keys["tpm-team"]["tokens"] > 0 and keys["tpm-team"]["by_limit"] == {"tpm": 1}
    assert keys["flight-team"]["by_limit"].get("max_in_flight", 0) >= 1
    assert 'aisemble_key_requests_total{key_name="rpm-team",service="llm"} 5.0' in metrics
    assert 'aisemble_key_rate_limited_total{key_name="rpm-team",limit="rpm"} 2.0' in metrics
    assert 'aisemble_key_tokens_total{key_name="tpm-team"}' in metrics


# --- two edges, one Redis; then that Redis away ----------------------------------------------------------


SHARED_KEY = "quota-shared-key-0123456789abcdef"
ALONE_KEY = "quota-alone-key-0123456789abcdef"


def _second_edge(pipeline: Pipeline, log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**pipeline.env, "AISEMBLE_EDGE_ID": f"{pipeline.prefix}-edge2", "AISEMBLE_EDGE_PORT": str(port)}
    out = (log_dir / f"{pipeline.prefix}-edge2.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "aisemble", "edge"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=5) as http:
        while True:
            assert proc.poll() is None, f"the second edge exited with {proc.returncode}"
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the second edge did not become healthy"
            time.sleep(0.2)


def _statuses(http: httpx.Client, key: str, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        started = time.monotonic()
        statuses.append(http.post("/data/process", json=RECORDS, headers={"X-API-Key": key}).status_code)
        assert time.monotonic() - started < ANSWER_BOUND_S
    return statuses


def test_two_edges_share_limits_in_redis_and_each_enforces_them_alone_without_it(
    infra_settings: Settings, tmp_path: Path
) -> None:
    handle = infra.start_redis(free_port(), tmp_path / "redis")
    settings = infra_settings.model_copy(update={"redis_url": handle.url})
    keys = [{"key": SHARED_KEY, "name": "shared", "rpm": 6}, {"key": ALONE_KEY, "name": "alone", "rpm": 3}]
    pipeline = Pipeline.isolated(settings, ["data"], tmp_path, AISEMBLE_API_KEYS=json.dumps(keys))
    second: subprocess.Popen[bytes] | None = None
    try:
        pipeline.start()
        second, url2 = _second_edge(pipeline, tmp_path)
        with httpx.Client(base_url=pipeline.url, timeout=30) as one, httpx.Client(base_url=url2, timeout=30) as two:
            shared = [s for _ in range(4) for s in (_statuses(one, SHARED_KEY, 1) + _statuses(two, SHARED_KEY, 1))]
            assert shared == [200] * 6 + [429, 429], shared  # 6 in total across both edges, then 429 on both

            os.kill(handle.pid, signal.SIGKILL)  # Redis goes away mid-test
            handle.stop(timeout=5)
            alone_one = _statuses(one, ALONE_KEY, 5)
            alone_two = _statuses(two, ALONE_KEY, 5)
            print("QUOTA-REDIS-DOWN:", json.dumps({"edge1": alone_one, "edge2": alone_two}))
            assert alone_one == [200, 200, 200, 429, 429]  # each edge enforces rpm 3 alone, in memory
            assert alone_two == [200, 200, 200, 429, 429]
        edge_log = (tmp_path / f"{pipeline.prefix}-edge.log").read_text(errors="replace")
        assert edge_log.count("each edge enforces the API key limits alone") == 1  # logged once per outage
        assert SHARED_KEY not in edge_log and ALONE_KEY not in edge_log
    finally:
        if second is not None and second.poll() is None:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=20)
            except subprocess.TimeoutExpired:
                second.kill()
                second.wait(timeout=10)
        pipeline.stop()
        handle.stop(timeout=5)
