"""bench/aiperf_llm.py's pure parts: the AIPerf command it runs and how it reads AIPerf's export.

AIPerf itself is a bench-full tool in its own venv (make install-aiperf), not run by the tests; these check
that the command asks for what the figures claim (streaming chat, fixed output length through ignore_eos and
min_tokens, the offline tokenizer by its cache name, goodput SLOs) and that AIPerf's metric names map to ours
(its per-request "inter_token_latency" is TPOT, its "inter_chunk_latency" is ITL).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.aiperf_llm import TOKENIZER_REPO, aiperf_command, parse_export, suite_rows


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_command_streams_chat_at_a_fixed_output_length_with_the_offline_tokenizer(tmp_path: Path) -> None:
    command = aiperf_command("http://127.0.0.1:9", 4, 32, 128, 64, ["time_to_first_token:500"], tmp_path)
    assert command[1] == "profile" and "--streaming" in command
    assert _option(command, "--endpoint-type") == "chat" and _option(command, "--url") == "http://127.0.0.1:9"
    assert _option(command, "--tokenizer") == TOKENIZER_REPO
    assert _option(command, "--concurrency") == "4" and _option(command, "--request-count") == "32"
    assert _option(command, "--osl") == "64" and _option(command, "--isl") == "128"
    assert json.loads(_option(command, "--extra-inputs")) == {"ignore_eos": True, "min_tokens": 64, "temperature": 0}
    assert _option(command, "--goodput") == "time_to_first_token:500"
    assert "--goodput" not in aiperf_command("http://127.0.0.1:9", 1, 8, 16, 8, [], tmp_path)


def _metric(p50: float) -> dict[str, float]:
    return {"avg": p50 * 1.1, "p50": p50, "p90": p50 * 2, "p99": p50 * 3}


def test_the_export_maps_aiperfs_metric_names_to_ours(tmp_path: Path) -> None:
    export = tmp_path / "profile_export_aiperf.json"
    export.write_text(
        json.dumps(
            {
                "time_to_first_token": _metric(400.0),
                "inter_chunk_latency": _metric(25.0),
                "inter_token_latency": _metric(27.0),
                "request_latency": _metric(2000.0),
                "output_token_throughput": {"avg": 61.5},
                "request_throughput": {"avg": 0.9},
                "goodput": {"avg": 0.7},
                "completed_request_count": {"avg": 31},
                "error_summary": [{"count": 1, "error_details": {"code": 500}}],
            }
        )
    )
    figures = parse_export(export)
    assert figures["ttft_ms"]["p50"] == 400.0 and figures["itl_ms"]["p50"] == 25.0
    assert figures["tpot_ms"]["p50"] == 27.0 and figures["e2el_ms"]["p99"] == 6000.0
    assert figures["output_tokens_per_s"] == 61.5 and figures["requests_per_s"] == 0.9
    assert figures["goodput_rps"] == 0.7 and figures["completed"] == 31 and figures["errors"] == 1
    point = {"concurrency": 4, "aiperf_cpu_share": 0.5, **figures}
    rows = suite_rows({"aiperf": {"points": [point]}})
    assert rows[0].startswith("## 14.") and "| 4 | 400.0/1200.0 | 25.0/75.0 | 27.0 | 2000.0 | 61.5 |" in rows[-2]
    assert suite_rows({}) == []  # the quick profile does not run it
