"""LLM streaming as a client sees it: time to first token and tokens/s per stream, over SSE.

``streaming(url, streams, max_tokens)`` opens ``streams`` concurrent ``POST /ai/llm/completion`` calls
with ``"stream": true`` (greedy, cache off, prompts from ``bench.samples_llm``), read by
``api.streaming.stream_timings``: per stream the seconds to the first event that carries text (TTFT), the
whole stream, and the generated tokens from the final ``done`` event's reply (``output.tokens``);
tokens/s per stream = tokens / total seconds, and the decode rate after the first token =
(tokens - 1) / (total - TTFT), only for a stream that sent its text in two or more events (one that
sent it all in one event is counted in ``not_streamed`` and listed under ``notes``).

It never raises for a stream that does not work: it returns ``{"skipped": "<why>"}`` when ``api.streaming``
is missing, or when no stream produced text (with the statuses and the last event seen), so the suite
records why instead of failing.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import httpx
import orjson

from bench.common import summary_ms
from bench.samples_llm import PROMPTS

PATH = "/ai/llm/completion"


async def streaming(url: str, streams: int, max_tokens: int = 32) -> dict[str, object]:
    """``streams`` concurrent SSE completions; TTFT and tokens/s per stream, or ``{"skipped": why}``."""
    try:
        stream_timings = importlib.import_module("api.streaming").stream_timings
    except (ImportError, AttributeError) as exc:
        return {"skipped": f"api.streaming.stream_timings unavailable: {exc!r}"}
    bodies = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.0, "cache": False}
        for i in range(streams)
    ]
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        results: list[Any] = await asyncio.gather(
            *(stream_timings(http, PATH, {**b, "stream": True}) for b in bodies), return_exceptions=True
        )
    rows: list[dict[str, Any]] = []
    problems: list[str] = []  # streams that failed
    notes: list[str] = []  # streams that answered but did not stream
    for r in results:
        if isinstance(r, BaseException):
            problems.append(repr(r)[:300])
            continue
        if r.status != 200 or r.ttft_s is None:
            problems.append(f"status {r.status}, last event {r.last[:300]!r}")
            continue
        try:
            tokens = int((orjson.loads(r.last).get("output") or {}).get("tokens", 0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            tokens = 0
        if r.text_events < 2 and tokens > 1:  # all text in one event: nothing was streamed before the end
            notes.append(f"{tokens} tokens arrived in {r.text_events} text event(s): not streamed")
        streamed = r.text_events >= 2 and tokens > 1 and r.total_s > r.ttft_s
        decode = (tokens - 1) / (r.total_s - r.ttft_s) if streamed else None
        rows.append(
            {
                "ttft_ms": r.ttft_s * 1000,
                "total_ms": r.total_s * 1000,
                "tokens": tokens,
                "text_events": r.text_events,
                "tokens_per_s": tokens / r.total_s if r.total_s else 0.0,
                "decode_tokens_per_s": decode,
            }
        )
    if not rows:
        return {"skipped": f"no stream produced text ({streams} tried): {problems[:3]}"}
    return {
        "streams": streams,
        "max_tokens": max_tokens,
        "ok": len(rows),
        "failed": len(problems),
        "problems": problems[:5],
        "not_streamed": len(notes),
        "notes": notes[:5],
        "ttft_ms": summary_ms([r["ttft_ms"] for r in rows]),
        "total_ms": summary_ms([r["total_ms"] for r in rows]),
        "tokens_per_s_per_stream": summary_ms([r["tokens_per_s"] for r in rows]),
        "decode_tokens_per_s_per_stream": summary_ms(
            [r["decode_tokens_per_s"] for r in rows if r["decode_tokens_per_s"] is not None]
        ),
        "text_events_mean": round(sum(r["text_events"] for r in rows) / len(rows), 2),
    }
