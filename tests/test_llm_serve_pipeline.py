"""``bench.llm_serve`` against a real pipeline (the edge and the llm agent on the shared Kafka and Redis), and
vLLM's ``ignore_eos`` / ``min_tokens`` through the HTTP routes (issue #17).

The driver runs a few seconds: one fixed-concurrency point and one Poisson-rate point, 8 output tokens each
(``ignore_eos``). Every figure must be present and consistent: TTFT <= e2e, every answer exactly 8 tokens,
goodput <= requests/s, tokens/s = tokens / seconds. No assertion on speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aisemble.pipeline import Pipeline
from bench import llm_serve
from streams.settings import Settings

pytestmark = pytest.mark.slow

TOKENS = 8


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    p = Pipeline.isolated(
        infra_settings, ["llm"], logs, AISEMBLE_REQUEST_TIMEOUT_S="120", AISEMBLE_LLM__THREADS="1"
    ).start(timeout_s=600)
    yield p
    p.stop()


def _check_point(point: dict[str, Any]) -> None:
    assert point["completed"] >= 1 and point["errors"] == 0 and point["unfinished"] == 0, point["problems"]
    assert point["problems"] == []
    assert point["output_tokens_per_request"] == [TOKENS]  # ignore_eos: every answer max_tokens long
    assert point["output_tokens"] == TOKENS * point["completed"]
    for key in ("ttft_ms", "e2el_ms", "tpot_ms"):
        assert point[key]["n"] == point["completed"], key
    assert point["itl_ms"]["n"] >= 1
    for q in ("p50", "p90", "p99", "max"):
        assert 0 < point["ttft_ms"][q] <= point["e2el_ms"][q], q  # each request's TTFT <= its e2e
    assert point["tpot_ms"]["max"] <= point["e2el_ms"]["max"]
    assert 0 <= point["goodput_requests_per_s"] <= point["requests_per_s"]
    assert point["slo_met"] <= point["completed"]
    assert point["output_tokens_per_s"] == pytest.approx(point["output_tokens"] / point["seconds"], rel=0.01)
    assert 0 < point["driver_cpu_share"] < 1


def test_the_driver_reports_every_figure_at_a_concurrency_and_a_rate_point(pipeline: Pipeline) -> None:
    result = llm_serve.run(
        pipeline.url, "smoke", ["ttft:60000", "tpot:60000"], concurrency=[2], rates=[1.0], duration_s=4.0,
        output_tokens=TOKENS, prompt_sets=["short"],
    )  # fmt: skip
    points = result["lines"][pipeline.url]["points"]["short"]
    assert [p.get("concurrency") for p in points] == [2, None] and points[1]["rate"] == 1.0
    for point in points:
        _check_point(point)
        assert point["slo_met"] == point["completed"]  # a minute a token: every request meets it
    strict = llm_serve.run(pipeline.url, "smoke", ["ttft:0.001"], concurrency=[1], rates=[], duration_s=1.0,
                           output_tokens=TOKENS, prompt_sets=["short"])  # fmt: skip
    point = strict["lines"][pipeline.url]["points"]["short"][0]
    _check_point(point)
    assert point["slo_met"] == 0 and point["goodput_requests_per_s"] == 0  # a microsecond TTFT: none meets it
    assert "| short | c=2 |" in llm_serve.table(result)


def test_ignore_eos_and_min_tokens_on_the_openai_and_native_routes(pipeline: Pipeline) -> None:
    with httpx.Client(base_url=pipeline.url, timeout=120) as http:
        messages = [{"role": "user", "content": "Hi"}]
        base = {"model": "llm", "messages": messages, "max_tokens": 40, "temperature": 0}
        short = http.post("/v1/chat/completions", json=base).json()
        assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 40
        forced = http.post("/v1/chat/completions", json={**base, "ignore_eos": True}).json()
        assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 40
        at_least = http.post("/v1/chat/completions", json={**base, "min_tokens": 30}).json()
        assert at_least["usage"]["completion_tokens"] >= 30
        prompt = {"model": "llm", "prompt": "Hi", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        completion = http.post("/v1/completions", json=prompt).json()
        assert completion["usage"]["completion_tokens"] == 12
        too_many = http.post("/v1/chat/completions", json={**base, "min_tokens": 41})
        assert too_many.status_code == 400
        error = too_many.json()["error"]
        assert error["param"] == "min_tokens" and "min_tokens (41)" in error["message"]
        assert "max_tokens (40)" in error["message"]
        wrong_type = http.post("/v1/chat/completions", json={**base, "ignore_eos": "yes"})
        assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "ignore_eos"
        native = {"prompt": "Hi", "max_tokens": 10, "temperature": 0, "ignore_eos": True, "cache": False}
        answer = http.post("/ai/llm/completion", json=native)
        assert answer.status_code == 200 and answer.json()["output"]["tokens"] == 10
        refused = http.post("/ai/llm/completion", json={**native, "min_tokens": 11})
        assert refused.status_code == 422
        assert "min_tokens (11)" in refused.text and "max_tokens (10)" in refused.text
