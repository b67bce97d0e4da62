"""What every LLM decode engine shares, whatever runs the model (torch or llama.cpp): rows, reports, and the
pure arithmetic that turns a row's generated tokens into its deltas and its final output.

No torch, no llama.cpp: the llama.cpp runtime (``agents.llm_llama``) imports this module without pulling
torch in (start-up time), and the torch engine (``agents.llm_engine``) re-exports its names.

Guarantees (both engines, through ``advance``):
- a row ends at EOS (``finish_reason`` stop, the EOS counted in ``tokens``), at its own ``max_tokens``
  (length), or at its first stop string (stop; the text is cut before it, ``tokens`` counts the tokens that
  spell it);
- a streaming row's deltas concatenate to its final text: text that might still be the start of a stop string,
  or half a UTF-8 character (U+FFFD at the end of the decoded text), is held back until it is known;
- vLLM's ``ignore_eos`` and ``min_tokens`` (:func:`eos_ends`): with ``ignore_eos`` an EOS never ends a row;
  with ``min_tokens`` an EOS ends it only after ``min_tokens`` other generated tokens, and a stop string only
  when it ends in the text of generated token ``min_tokens`` or later (vLLM checks stops from then on). An EOS
  that does not end a row is kept and counted in ``tokens`` (vLLM counts it too) but its text never appears:
  ``Decode`` skips control tokens in both runtimes (``skip_special_tokens``, llama.cpp's pieces without
  ``special``), as vLLM's detokenizer does by default. Neither runtime masks EOS out of the sampling as vLLM's
  ``min_tokens`` does: a row may generate EOS and go on, which only a benchmark asks for.

What can go wrong: ``decode`` raising propagates to the engine, which fails the row's pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agents.runner import Failure, Outcome
from schemas import ErrorCode
from schemas.llm import SamplingInput

Decode = Callable[[Sequence[int]], str]  # token ids -> text, control tokens (EOS) rendered as nothing


def epoch_ms() -> float:
    """The wall clock in epoch milliseconds (the unit of ``deadline_ms``)."""
    return time.time() * 1000.0


@dataclass(frozen=True, slots=True)
class RowRequest:
    """One row to generate: ``key`` names it in reports (unique among the engine's live rows)."""

    key: str
    ids: Sequence[int]
    params: SamplingInput
    deadline_ms: float | None = None
    stream: bool = False
    grammar: str | None = None  # GBNF the tokens must follow (``schemas.structured``; the llama.cpp runtime)


@dataclass(frozen=True, slots=True)
class Delta:
    """New text of a streaming row since its previous delta (``tokens``: tokens generated since then)."""

    key: str
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Finished:
    """A row's final outcome; ``ids``: every token it generated (before any cut), for tests and figures."""

    key: str
    outcome: Outcome
    ids: tuple[int, ...] = ()


@dataclass(slots=True)
class StepReport:
    """What one ``step`` did."""

    deltas: list[Delta] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)
    prefilled_tokens: int = 0
    decoded_rows: int = 0


@dataclass(slots=True)
class RowState:
    """A row's generation so far (engines extend it with their own per-row state)."""

    request: RowRequest
    generated: list[int] = field(default_factory=list)
    reported_tokens: int = 0
    emitted: str = ""

    @property
    def key(self) -> str:
        return self.request.key


class StepEngine(Protocol):
    """What the continuous loop drives (``agents.llm_engine.DecodeEngine``, ``agents.llm_llama.LlamaEngine``)."""

    max_batch: int

    def add(self, request: RowRequest) -> None: ...

    def cancel(self, key: str) -> None: ...

    @property
    def active(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    def step(self) -> StepReport: ...


# -- output arithmetic shared with the static path (agents.llm_torch) ---------------------------------------


def first_stop(text: str, stops: Sequence[str], after: int = 0) -> tuple[int, int] | None:
    """``(start, end)`` of the earliest stop string in ``text`` that ends past character ``after``, or ``None``."""
    best: tuple[int, int] | None = None
    for stop in stops:
        at = text.find(stop, max(0, after - len(stop) + 1))
        if at >= 0 and (best is None or at < best[0]):
            best = (at, at + len(stop))
    return best


def eos_ends(token: int, generated: int, params: SamplingInput, eos_ids: frozenset[int]) -> bool:
    """Whether ``token``, the row's ``generated``-th token, is an EOS that ends it (not under ``ignore_eos``,
    nor before ``min_tokens`` other tokens)."""
    return token in eos_ids and not params.ignore_eos and generated > params.min_tokens


def stops_after(ids: Sequence[int], params: SamplingInput, decode: Decode) -> int:
    """Characters of text a stop string must end past: the text of the first ``min_tokens - 1`` tokens (a stop
    string counts once it ends in the text of token ``min_tokens`` or later); 0 without ``min_tokens``."""
    if params.min_tokens <= 1:
        return 0
    return len(decode(ids[: params.min_tokens - 1]).rstrip("\ufffd"))


def tokens_to_cover(ids: list[int], prefix: str, decode: Decode) -> int:
    """Fewest leading tokens of ``ids`` whose text starts with ``prefix`` (binary search)."""
    low, high = 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        if decode(ids[:middle]).startswith(prefix):
            high = middle
        else:
            low = middle + 1
    return high


def finish_output(
    ids: list[int], params: SamplingInput, eos_ids: frozenset[int], decode: Decode, prompt_tokens: int
) -> dict[str, object]:
    """The output dict of a row that generated ``ids``: cut at ``max_tokens``, EOS, or the first stop string
    (EOS and stop strings as ``ignore_eos`` and ``min_tokens`` allow: see the module docstring).

    ``tokens`` counts up to the cut: the EOS token when it ended the row, the tokens spelling the stop string
    when one did (the stop string itself is cut from ``text``).
    """
    kept = ids[: params.max_tokens]
    finish = "length"
    body = kept
    for position, token in enumerate(kept):
        if eos_ends(token, position + 1, params, eos_ids):
            kept, body, finish = kept[: position + 1], kept[:position], "stop"
            break
    text = decode(body)
    tokens = len(kept)
    hit = first_stop(text, params.stop or [], stops_after(body, params, decode)) if params.stop else None
    if hit is not None:
        start, end = hit
        tokens = tokens_to_cover(body, text[:end], decode)
        text, finish = text[:start], "stop"
    return {"text": text, "tokens": tokens, "finish_reason": finish, "prompt_tokens": prompt_tokens}


def deadline_failure(generated: int) -> Failure:
    return Failure(
        ErrorCode.DEADLINE_EXCEEDED, f"the request's deadline passed after {generated} generated tokens; stopped"
    )


def cancelled_failure(generated: int) -> Failure:
    return Failure(ErrorCode.CANCELLED, f"cancelled by the caller after {generated} generated tokens")


def stop_failure(row: RowState, cancelled: set[str], now_ms: float) -> Failure | None:
    """Why ``row`` must leave before its next token (cancelled by its caller, or past its deadline), or None."""
    if row.key in cancelled:
        return cancelled_failure(len(row.generated))
    deadline = row.request.deadline_ms
    if deadline is not None and now_ms >= deadline:
        return deadline_failure(len(row.generated))
    return None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` may not be streamed yet: a split UTF-8 character (U+FFFD)
    or the longest suffix that is the start of a stop string."""
    keep = len(text) - len(text.rstrip("\ufffd"))
    text = text[: len(text) - keep]
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return keep + longest


_held_back = held_back  # the name the torch engine's tests knew


def advance(row: RowState, token: int, eos_ids: frozenset[int], decode: Decode, report: StepReport) -> bool:
    """Append ``token`` to the row, report its delta and, if it is done, its outcome. True when done."""
    row.generated.append(token)
    request = row.request
    params = request.params
    count = len(row.generated)
    done = count >= params.max_tokens or eos_ends(token, count, params, eos_ids)
    if not done and not request.stream and not params.stop:
        return False  # the common case: nothing to decode
    stops = (params.stop or []) if count >= params.min_tokens else []  # none counts before min_tokens (vLLM)
    text: str | None = None
    if not done and request.stream:
        text = decode(row.generated)  # the whole text: deltas are cut from it
        done = bool(stops) and first_stop(text, stops, stops_after(row.generated, params, decode)) is not None
    elif not done and stops and params.min_tokens > 1:
        text = decode(row.generated)  # a stop string must end past the first min_tokens - 1 tokens' text
        done = first_stop(text, stops, stops_after(row.generated, params, decode)) is not None
    elif not done and stops:
        # Only a tail long enough to hold the longest stop string (UTF-8 is <= 4 bytes a character): a stop
        # string ends in the tokens of the step that completes it, so no earlier one can be missed.
        window = 4 * max(len(stop) for stop in stops) + 2
        done = first_stop(decode(row.generated[-window:]), stops) is not None
    if done:
        outcome = finish_output(row.generated, params, eos_ids, decode, len(request.ids))
        if request.stream:
            _delta(row, str(outcome["text"]), int(str(outcome["tokens"])), report)
        report.finished.append(Finished(row.key, outcome, tuple(row.generated)))
        return True
    if request.stream and text is not None:
        safe = text[: len(text) - held_back(text, params.stop or [])]  # before min_tokens too: it may count later
        _delta(row, safe, len(row.generated), report)
    return False


def _delta(row: RowState, text: str, tokens: int, report: StepReport) -> None:
    piece = text[len(row.emitted) :] if text.startswith(row.emitted) else ""
    row.emitted += piece
    new_tokens = max(0, tokens - row.reported_tokens)
    row.reported_tokens = max(row.reported_tokens, tokens)
    report.deltas.append(Delta(row.key, piece, new_tokens))
