"""Per-key quotas, the pure part: OpenAI's rate-limit headers, the LLM token estimate, the per-key counts.

An entry of ``AISEMBLE_API_KEYS`` may carry quotas (``streams.settings.ApiKey``: ``rpm``, ``tpm``,
``max_in_flight``, ``services``). ``api.quota_store`` keeps the counters (Redis, shared by every edge; in memory
per edge while Redis is away) and ``api.quota_gate`` applies them to each request. This module holds what
needs no I/O, so it is unit-tested in microseconds:

* ``Window``: one limit as the caller sees it (limit, remaining, seconds until capacity frees), and
  ``rate_headers``: OpenAI's ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
  ``x-ratelimit-reset-requests`` (and the ``-tokens`` three when ``tpm`` is set), the reset in OpenAI's
  duration format (``duration``: ``20ms``, ``1s``, ``6m0s``, ``1h0m0s``); ``retry_after_s``: the integer
  ``Retry-After`` (seconds, rounded up, at least 1).
* ``estimate_tokens``: what an LLM request is charged at admission, before any model saw it. The edge cannot
  tokenise (the tokenizer lives with the agent), so the prompt counts as its UTF-8 bytes / 4, rounded up
  (about a token per 4 bytes of English for SmolLM2's BPE and OpenAI's), plus ``max_tokens``: the most the
  reply may add. The chat template's own tokens are not seen, so the correction after the answer
  (``usage_tokens``: the reply's prompt tokens + completion tokens) usually gives back the unused part of
  ``max_tokens`` and charges a few template tokens.
* ``KeyStats``: requests (per service), tokens and 429s (per limit) per key *name* at this edge, for
  ``/metrics`` (``aisemble_key_*``) and ``/status.json``. It never sees a key, only ``ApiKey.name``.

What can go wrong: the estimate is an estimate (a prompt of rare characters has more tokens than bytes / 4);
the correction fixes the count after the answer, so a key is never charged more than its usage for long.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

WINDOW_S = 60  # rpm and tpm are per minute
BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Window:
    """One limit as a caller sees it: ``limit`` per minute, ``remaining`` now, ``reset_in_s`` until capacity
    frees again (0: nothing is used)."""

    limit: int
    remaining: int
    reset_in_s: float


def duration(seconds: float) -> str:
    """``seconds`` in OpenAI's duration format: ``0s``, ``250ms`` (under a second), ``7s``, ``6m0s``, ``1h2m3s``
    (whole seconds rounded up above one second)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    total = math.ceil(seconds - 1e-9)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_after_s(reset_in_s: float) -> int:
    """The ``Retry-After`` header's seconds for a limit that frees in ``reset_in_s``: rounded up, at least 1."""
    return max(1, math.ceil(reset_in_s - 1e-9))


def rate_headers(requests: Window | None, tokens: Window | None) -> list[tuple[bytes, bytes]]:
    """OpenAI's rate-limit headers (ASGI form) for the limits a key has; none for a limit it has not."""
    headers: list[tuple[bytes, bytes]] = []
    for kind, window in (("requests", requests), ("tokens", tokens)):
        if window is None:
            continue
        headers += [
            (f"x-ratelimit-limit-{kind}".encode(), str(window.limit).encode()),
            (f"x-ratelimit-remaining-{kind}".encode(), str(max(window.remaining, 0)).encode()),
            (f"x-ratelimit-reset-{kind}".encode(), duration(window.reset_in_s).encode()),
        ]
    return headers


def prompt_tokens_estimate(text_bytes: int) -> int:
    """Tokens a prompt of ``text_bytes`` UTF-8 bytes is charged at admission: bytes / 4, rounded up."""
    return -(-text_bytes // BYTES_PER_TOKEN)


def estimate_tokens(payload: Mapping[str, object]) -> int:
    """The tokens an LLM task input (``completion``: ``prompt``; ``chat``: ``messages``) is charged at admission:
    the prompt's estimate (``prompt_tokens_estimate``) plus ``max_tokens`` (the schema's default 100 if absent)."""
    size = 0
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        size += len(prompt.encode("utf-8", errors="replace"))
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                size += len(content.encode("utf-8", errors="replace"))
    max_tokens = payload.get("max_tokens")
    return prompt_tokens_estimate(size) + (max_tokens if isinstance(max_tokens, int) else 100)


def usage_tokens(output: Mapping[str, object] | None) -> int:
    """The tokens an LLM reply used (its ``usage.total_tokens``): ``prompt_tokens`` + ``tokens`` (completion)."""
    if not output:
        return 0
    total = 0
    for name in ("prompt_tokens", "tokens"):
        value = output.get(name)
        if isinstance(value, int) and value > 0:
            total += value
    return total


@dataclass(slots=True)
class KeyCounts:
    """One key name's counts at this edge."""

    requests: dict[str, int] = field(default_factory=dict)  # service -> requests
    tokens: int = 0
    limited: dict[str, int] = field(default_factory=dict)  # limit (rpm, tpm, max_in_flight) -> 429s

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": sum(self.requests.values()),
            "by_service": dict(sorted(self.requests.items())),
            "tokens": self.tokens,
            "rate_limited": sum(self.limited.values()),
            "by_limit": dict(sorted(self.limited.items())),
        }


class KeyStats:
    """Requests, tokens and 429s per key name at this edge (since it started); see the module docstring."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.keys: dict[str, KeyCounts] = {name: KeyCounts() for name in names or []}

    def _of(self, name: str) -> KeyCounts:
        counts = self.keys.get(name)
        if counts is None:
            counts = self.keys[name] = KeyCounts()
        return counts

    def request(self, name: str, service: str) -> None:
        counts = self._of(name)
        counts.requests[service] = counts.requests.get(service, 0) + 1

    def tokens(self, name: str, n: int) -> None:
        if n > 0:
            self._of(name).tokens += n

    def limited(self, name: str, limit: str) -> None:
        counts = self._of(name)
        counts.limited[limit] = counts.limited.get(limit, 0) + 1

    def snapshot(self) -> dict[str, dict[str, object]]:
        """``{name: {"requests", "by_service", "tokens", "rate_limited", "by_limit"}}``, sorted by name."""
        return {name: self.keys[name].as_dict() for name in sorted(self.keys)}
