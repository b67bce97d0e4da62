"""The pure parts of ``bench.llm_serve`` (issue #17): TTFT, ITL, TPOT, e2e and goodput from synthetic chunk
timelines, the SSE event reading, the Poisson schedule, SLO and list parsing, and the table. No server."""

from __future__ import annotations

import itertools
import statistics

import orjson
import pytest

from bench import llm_serve as ls


def _timeline(chunks: list[float], end: float, tokens: int | None, status: int = 200) -> ls.Timeline:
    return ls.Timeline(chunks=chunks, end=end, usage_tokens=tokens, status=status)


def test_request_metrics_ttft_itl_tpot_and_e2e_from_a_chunk_timeline() -> None:
    # 4 content chunks at 0.2, 0.25, 0.35, 0.40 s; the stream ends at 0.5 s; 6 tokens by usage
    m = ls.request_metrics(_timeline([0.2, 0.25, 0.35, 0.40], 0.5, 6))
    assert m is not None
    assert m.ttft == pytest.approx(200.0)
    assert m.itl == pytest.approx((50.0, 100.0, 50.0))  # one gap per chunk after the first (vLLM's convention)
    assert m.tpot == pytest.approx((500.0 - 200.0) / 5)  # (e2e - TTFT) / (tokens - 1)
    assert m.e2el == pytest.approx(500.0)
    assert m.output_tokens == 6


def test_without_usage_the_output_tokens_are_the_content_chunks_and_one_token_has_no_tpot() -> None:
    m = ls.request_metrics(_timeline([0.1, 0.3], 0.4, None))
    assert m is not None and m.output_tokens == 2 and m.tpot == pytest.approx(300.0)
    one = ls.request_metrics(_timeline([0.1], 0.1, 1))
    assert one is not None and one.tpot is None and one.itl == ()


@pytest.mark.parametrize(
    "timeline",
    [
        _timeline([0.1], 0.2, 1, status=503),
        ls.Timeline(chunks=[0.1], end=None, usage_tokens=1, status=200),  # no [DONE]
        ls.Timeline(chunks=[], end=0.2, usage_tokens=0, status=200),  # no content
        ls.Timeline(chunks=[0.1], end=0.2, usage_tokens=1, status=200, error="error event: x"),
    ],
)
def test_a_failed_request_has_no_metrics(timeline: ls.Timeline) -> None:
    assert ls.request_metrics(timeline) is None


def test_goodput_counts_requests_meeting_every_slo_over_the_wall_time() -> None:
    fast = _timeline([0.1, 0.15, 0.2], 0.25, 3)  # TTFT 100, TPOT 75, max ITL 50, e2e 250
    slow_first = _timeline([0.9, 0.95, 1.0], 1.05, 3)  # TTFT 900
    slow_tokens = _timeline([0.1, 0.4, 0.7], 0.8, 3)  # TPOT 350, ITL 300
    failed = _timeline([], 0.1, 0, status=500)
    timelines = [fast, slow_first, slow_tokens, failed]
    p = ls.point_figures(timelines, wall_s=2.0, slos={"ttft": 500, "tpot": 100}, driver_cpu_s=0.2, cpus=2)
    assert (p["requests"], p["completed"], p["errors"], p["slo_met"]) == (4, 3, 1, 1)
    assert p["requests_per_s"] == 1.5 and p["goodput_requests_per_s"] == 0.5
    assert p["output_tokens"] == 9 and p["output_tokens_per_s"] == 4.5
    assert p["output_tokens_per_request"] == [3]
    assert p["driver_cpu_share"] == 0.05  # 0.2 CPU-s / 2 s / 2 CPUs
    assert p["goodput_requests_per_s"] <= p["requests_per_s"]
    assert ls.point_figures(timelines, 2.0, {"ttft": 1000}, 0.0, 2)["slo_met"] == 3
    assert ls.point_figures(timelines, 2.0, {"itl": 100}, 0.0, 2)["slo_met"] == 2
    assert ls.point_figures(timelines, 2.0, {"e2el": 300}, 0.0, 2)["slo_met"] == 1
    assert ls.point_figures(timelines, 2.0, {}, 0.0, 2)["slo_met"] == 3  # no SLO: every completed request


def test_point_percentiles_pool_every_gap_of_every_request() -> None:
    a = _timeline([0.1, 0.2, 0.3], 0.3, 3)  # gaps 100, 100
    b = _timeline([0.5, 0.51], 0.6, 2)  # gap 10
    p = ls.point_figures([a, b], 1.0, {}, 0.0, 1)
    assert p["itl_ms"]["n"] == 3
    assert p["itl_ms"]["mean"] == pytest.approx(statistics.fmean([100, 100, 10]), abs=1e-3)
    assert p["ttft_ms"]["n"] == 2 and p["ttft_ms"]["max"] == pytest.approx(500.0)
    assert p["e2el_ms"]["p50"] <= p["e2el_ms"]["p99"]


def test_read_event_takes_content_chunks_usage_errors_and_done() -> None:
    t = ls.Timeline(status=200)
    opening = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None}
    assert not ls.read_event(orjson.dumps(opening), t, 0.05)
    assert t.chunks == []  # the role chunk is not a token
    assert not ls.read_event(orjson.dumps({"choices": [{"delta": {"content": "Hi"}}]}), t, 0.1)
    assert not ls.read_event(orjson.dumps({"choices": [{"text": " there"}]}), t, 0.2)  # /v1/completions' shape
    assert not ls.read_event(orjson.dumps({"choices": [], "usage": {"completion_tokens": 7}}), t, 0.3)
    assert ls.read_event(b"[DONE]", t, 0.4)
    assert (t.chunks, t.usage_tokens, t.end, t.ok) == ([0.1, 0.2], 7, 0.4, True)
    bad = ls.Timeline(status=200, chunks=[0.1])
    ls.read_event(orjson.dumps({"error": {"message": "boom"}}), bad, 0.2)
    ls.read_event(b"[DONE]", bad, 0.3)
    assert not bad.ok and "boom" in str(bad.error)


def test_chat_body_fixes_the_output_length_with_ignore_eos_and_streams_usage() -> None:
    body = ls.chat_body("Hi", 64, "llm")
    assert body["max_tokens"] == body["min_tokens"] == 64 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_the_poisson_schedule_is_reproducible_from_its_seed_and_has_the_rate_as_mean() -> None:
    a = ls.poisson_schedule(2.0, 2000, seed=7)
    assert a == ls.poisson_schedule(2.0, 2000, seed=7)
    assert a != ls.poisson_schedule(2.0, 2000, seed=8)
    assert all(later > earlier for earlier, later in itertools.pairwise(a)) and a[0] > 0
    gaps = [a[0], *(later - earlier for earlier, later in itertools.pairwise(a))]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.1)  # mean gap 1 / rate
    assert statistics.pstdev(gaps) == pytest.approx(0.5, rel=0.15)  # exponential: sd = mean
    with pytest.raises(ValueError, match="positive"):
        ls.poisson_schedule(0.0, 3, seed=1)


def test_parse_slos_reads_metric_ms_pairs() -> None:
    assert ls.parse_slos(["ttft:500", "TPOT:100", "e2el:2000.5", "itl:50"]) == {
        "ttft": 500.0, "tpot": 100.0, "e2el": 2000.5, "itl": 50.0,
    }  # fmt: skip
    assert ls.parse_slos([]) == {}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (["ttft500"], "expected METRIC:MS"),
        (["latency:5"], "unknown metric 'latency'"),
        (["ttft:fast"], "not a number"),
        (["ttft:0"], "positive"),
        (["ttft:-3"], "positive"),
        (["ttft:nan"], "positive"),
        (["ttft:5", "ttft:6"], "given twice"),
    ],
)
def test_parse_slos_refuses_what_it_cannot_read_saying_why(spec: list[str], says: str) -> None:
    with pytest.raises(ls.SloError, match=says):
        ls.parse_slos(spec)


def test_number_lists_for_the_command_line() -> None:
    assert ls.int_list("1, 4,8") == [1, 4, 8] and ls.int_list(None) is None
    assert ls.float_list("0.5,1") == [0.5, 1.0] and ls.float_list("") == []
    for bad in ("0", "a", "1.5"):
        with pytest.raises(ValueError):
            ls.int_list(bad)
    for bad in ("0", "-1", "inf", "x"):
        with pytest.raises(ValueError):
            ls.float_list(bad)


def test_the_long_prompts_are_a_few_hundred_words_and_distinct() -> None:
    prompts = ls.long_prompts()
    assert len(set(prompts)) == len(prompts) >= 2
    assert all(150 <= len(p.split()) <= 600 for p in prompts)


def test_the_table_has_a_row_per_point_and_names_a_failed_server() -> None:
    point = ls.point_figures([_timeline([0.1, 0.2], 0.3, 2)], 1.0, {"ttft": 500}, 0.1, 2)
    result = {
        "output_tokens": 2, "duration_s": 1.0, "slos": {"ttft": 500.0},
        "lines": {
            "aisemble": {"points": {"short": [{"concurrency": 1, **point}, {"rate": 0.5, **point}]}},
            "llama-server": {"failed": "RuntimeError: not built"},
        },
    }  # fmt: skip
    text = ls.table(result)
    assert "| aisemble | short | c=1 | 100/100/100 |" in text
    assert "| aisemble | short | 0.5 req/s |" in text
    assert "llama-server | — | RuntimeError: not built" in text
    assert "ttft ≤ 500 ms" in text


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--goodput", "ttft500"], "expected METRIC:MS"),
        (["--goodput", "ttft:500 speed:3"], "unknown metric 'speed'"),
        (["--concurrency", "0"], "concurrency must be >= 1"),
        (["--rates", "fast"], "not a comma-separated list"),
        (["--prompts", "medium"], "unknown prompt set 'medium'"),
    ],
)
def test_aisemble_bench_llm_refuses_bad_arguments_before_starting_anything(args: list[str], says: str) -> None:
    from typer.testing import CliRunner

    from aisemble.cli import app

    result = CliRunner().invoke(app, ["bench", "llm", *args])
    assert result.exit_code == 2
    assert says in " ".join(result.output.replace("│", " ").split())


def test_summary_rows_show_the_table_or_why_there_is_none() -> None:
    point = ls.point_figures([_timeline([0.1, 0.2], 0.3, 2)], 1.0, {}, 0.0, 2)
    section = {"output_tokens": 2, "duration_s": 1.0, "slos": {}, "lines": {"aisemble": {"points": {"long": [
        {"concurrency": 4, **point}]}}, "llama-server": {"skipped": "llama-server is not built"}}}  # fmt: skip
    rows = "\n".join(ls.summary_rows({"llm_serve": section}))
    assert rows.startswith("## 12.") and "| aisemble | long | c=4 |" in rows
    assert "| llama-server | — | llama-server is not built |" in rows
    failed = ls.summary_rows({"llm_serve": {"failed": "TimeoutError: edge not healthy"}})
    assert "failed: TimeoutError: edge not healthy" in failed
    assert "not run" in ls.summary_rows({})


def test_every_request_has_its_own_prompt_start_so_no_prompt_cache_skips_its_prefill() -> None:
    load = ls.Load(ls.long_prompts(), 8, 1.0, concurrency=1)
    messages = [orjson.loads(load.body(i))["messages"][0]["content"] for i in range(12)]
    assert len(set(messages)) == 12
    assert len({m.split(".")[0] for m in messages}) == 12  # distinct within the first words
    assert messages[5].endswith(ls.long_prompts()[5 % 4])
