"""A step-wise decode engine for continuous (in-flight) batching of a Hugging Face causal LM.

Pure torch + transformers: no Kafka, no asyncio. The owner ``add``s rows and calls ``step()`` repeatedly
(from one worker thread); each step

1. retires rows that were cancelled (``cancel``) or whose deadline passed, waiting or running;
2. prefills new rows within a prompt-token budget (``max_prefill_tokens``): rows that fit are prefilled
   together (left-padded); a prompt longer than the whole budget is prefilled alone in chunks of the
   budget over several steps, so it never stalls the running rows for more than one budget's worth;
   a prefilled row samples its first token from the prefill's logits;
3. decodes ONE token for every row that was already running (one forward over the batch, KV cache reused);
4. merges the newly prefilled rows into the running batch: caches left-padded to a common length and
   concatenated on the batch dimension, attention masks extended, position ids kept per row (the count of
   the row's real tokens), so a row sees exactly the positions it would see alone;
5. finished rows leave at once (the cache's batch dimension is index-selected, all-padding columns on the
   left are trimmed). At most ``max_batch`` rows are prefilling or running.

Per row: its own ``max_tokens``, stop strings (the text is cut before the first one, as the static path
does), ``temperature``/``top_p`` (top-k off), ``seed``, ``deadline_ms`` and a cancelled flag. Greedy rows
take the argmax. A seeded sampled row draws from its own ``torch.Generator`` seeded with its seed, so its
text does not depend on its neighbours (up to float rounding: a padded batched matmul may differ from an
unpadded one in the last bits). Measured: in float32 the greedy tokens equal ``generate`` alone exactly, on CPU
(``tests/test_llm_engine.py``) and on an H200 (8 of 8 rows, joining mid-generation and chunk-prefilled); in
bfloat16 on the H200, 6 of 8 rows were equal and 2 took another token after 19 and 27 tokens (random weights,
whose logits have near-ties): bf16 rounding, as with ``generate`` on a padded batch.
Unseeded sampled rows draw from torch's global generator. The model's own generation-config logits
processors (e.g. ``suppress_tokens``, a repetition penalty) apply to every row, as in ``generate``.

Each step returns a ``StepReport``: per streaming row the text decoded since its previous delta (text
that might still turn out to be the start of a stop string, or half a UTF-8 character, is held back, so the
deltas of a row concatenate to its final text), and per finished row its outcome: the output dict
(``text``, ``tokens``, ``finish_reason`` stop/length, ``prompt_tokens``), or a ``Failure``
(``deadline_exceeded``, ``cancelled``, ``model_error``).

What can go wrong: a forward pass raising fails the rows of that pass (``model_error``): a prefill failure
fails only the rows being prefilled; a decode failure fails every running row (the cache is dropped);
the engine itself stays usable. Models whose cache is not a plain ``DynamicCache`` of ``DynamicLayer``s
(sliding-window or recurrent layers) are refused with ``EngineUnsupported`` at the first prefill (the
runner then keeps static batching). ``add`` and ``cancel`` may be called from another thread; ``step`` must
not run in two threads at once.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from agents.errors import AgentError
from agents.llm_rows import (
    Decode,
    Delta,
    Finished,
    RowRequest,
    RowState,
    StepReport,
    _held_back,
    advance,
    deadline_failure,
    epoch_ms,
    finish_output,
    first_stop,
    stop_failure,
    tokens_to_cover,
)
from agents.runner import Failure
from schemas import ErrorCode

logger = logging.getLogger(__name__)

__all__ = [  # the shared row types and helpers (agents.llm_rows), re-exported for existing callers
    "Decode",
    "DecodeEngine",
    "Delta",
    "EngineUnsupported",
    "Finished",
    "RowRequest",
    "StepReport",
    "_held_back",
    "deadline_failure",
    "epoch_ms",
    "finish_output",
    "first_stop",
    "tokens_to_cover",
]


class EngineUnsupported(AgentError):
    """The model's KV cache cannot be merged and split by rows (not a plain ``DynamicLayer`` cache)."""


@dataclass(slots=True)
class _Row(RowState):
    generator: torch.Generator | None = None
    prefilled: int = 0  # prompt tokens in the row's cache (chunked prefill)
    cache: DynamicCache | None = None  # its own cache while chunk-prefilling


_Joined = tuple[list["_Row"], DynamicCache, torch.Tensor]  # prefilled rows, their cache and mask, to merge


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeEngine:
    """Continuous batching over one model; see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        eos_ids: frozenset[int],
        decode: Decode,
        pad_id: int,
        max_batch: int,
        max_prefill_tokens: int,
        clock_ms: Callable[[], float] = epoch_ms,
        on_error: Callable[[Exception], None] | None = None,
        threads: int | None = None,
    ) -> None:
        """``on_error`` is told of every failed forward pass (the runner drops a ``torch.compile``d forward);
        ``threads``: torch CPU threads, applied in whichever thread runs ``step`` (OpenMP keeps it per thread)."""
        self._model = model
        self._threads = threads
        self._on_error = on_error
        self._device = device
        self._eos_ids = eos_ids
        self._decode = decode
        self._pad_id = pad_id
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._clock_ms = clock_ms
        self._processors = _model_processors(model, device)
        self._lock = threading.Lock()
        self._incoming: list[_Row] = []
        self._cancelled: set[str] = set()
        self._waiting: deque[_Row] = deque()
        self._chunking: _Row | None = None
        self._running: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length], 1 = a real token
        self.steps = 0

    # -- the owner's side ---------------------------------------------------------------------------------

    def add(self, request: RowRequest) -> None:
        """Queue a row; it is prefilled by a coming step (thread-safe)."""
        seed = request.params.seed
        generator: torch.Generator | None = None
        if request.params.temperature > 0.0 and seed is not None:
            generator = torch.Generator(device=self._device)
            generator.manual_seed(seed)
        with self._lock:
            self._incoming.append(_Row(request, generator=generator))

    def cancel(self, key: str) -> None:
        """Stop the row ``key`` at the next step, answered ``cancelled`` (thread-safe; unknown keys are ignored)."""
        with self._lock:
            self._cancelled.add(key)

    @property
    def active(self) -> int:
        """Rows added and not yet finished."""
        with self._lock:
            incoming = len(self._incoming)
        return incoming + len(self._waiting) + len(self._running) + (self._chunking is not None)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch - self.active)

    def step(self) -> StepReport:
        """One iteration: retire, prefill within the budget, decode one token per running row, merge."""
        report = StepReport()
        if self._threads is not None and torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            cancelled, self._cancelled = self._cancelled, set()
        with torch.inference_mode():
            self._retire(report, cancelled)
            joined = self._prefill(report)
            if self._running:
                self._decode_step(report)
            self._merge(joined)
        self.steps += 1
        return report

    # -- retiring -----------------------------------------------------------------------------------------

    def _retire(self, report: StepReport, cancelled: set[str]) -> None:
        now = self._clock_ms()

        def stopped(row: _Row) -> Failure | None:
            return stop_failure(row, cancelled, now)

        for row in list(self._waiting):
            failure = stopped(row)
            if failure is not None:
                self._waiting.remove(row)
                report.finished.append(Finished(row.key, failure))
        if self._chunking is not None and (failure := stopped(self._chunking)) is not None:
            report.finished.append(Finished(self._chunking.key, failure))
            self._chunking = None
        gone = []
        for index, row in enumerate(self._running):
            failure = stopped(row)
            if failure is not None:
                report.finished.append(Finished(row.key, failure))
                gone.append(index)
        self._drop(gone)

    def _drop(self, indices: Sequence[int]) -> None:
        """Remove running rows at ``indices`` (the cache's batch dimension is index-selected)."""
        if not indices:
            return
        keep = [i for i in range(len(self._running)) if i not in set(indices)]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0]) if bool(mask.any()) else 0  # all-padding columns on the left
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            keys, values = _kv(layer)
            keys, values = keys.index_select(0, index)[:, :, first:], values.index_select(0, index)[:, :, first:]
            _set_kv(layer, keys.contiguous(), values.contiguous())  # one stride layout: fewer torch.compile guards

    # -- prefill ------------------------------------------------------------------------------------------

    def _prefill(self, report: StepReport) -> list[_Joined]:
        """Prefill within the budget; returns the rows that got their first token (with their cache and mask)
        and did not finish at once."""
        budget = self.max_prefill_tokens
        slots = self.max_batch - len(self._running)
        joined: list[_Joined] = []
        if self._chunking is not None:
            slots -= 1
            budget -= self._chunk(self._chunking, budget, report, joined)
        group: list[_Row] = []
        while self._waiting and slots > len(group) and budget > 0:
            row = self._waiting[0]
            size = len(row.request.ids)
            if size <= budget:
                group.append(self._waiting.popleft())
                budget -= size
            elif not group and self._chunking is None:
                self._chunking = self._waiting.popleft()
                budget -= self._chunk(self._chunking, budget, report, joined)
                slots -= 1
            else:
                break
        if group:
            self._prefill_group(group, report, joined)
        return joined

    def _prefill_group(self, rows: list[_Row], report: StepReport, joined: list[_Joined]) -> None:
        width = max(len(r.request.ids) for r in rows)
        ids = torch.tensor(
            [[self._pad_id] * (width - len(r.request.ids)) + list(r.request.ids) for r in rows], dtype=torch.long
        ).to(self._device)
        mask = torch.tensor(
            [[0] * (width - len(r.request.ids)) + [1] * len(r.request.ids) for r in rows], dtype=torch.long
        ).to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            out = self._model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            cache = _checked(out.past_key_values)
            tokens = self._choose(rows, out.logits[:, -1, :])
        except EngineUnsupported:
            raise
        except Exception as exc:  # noqa: BLE001  (policy: a model failure fails the rows of that pass, not the engine)
            self._fail(rows, exc, report)
            return
        report.prefilled_tokens += sum(len(r.request.ids) for r in rows)
        keep: list[int] = []
        for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.prefilled = len(row.request.ids)
            if not self._advance(row, token, report):
                keep.append(index)
        if keep:
            joined.append(_select(rows, keep, cache, mask))

    def _chunk(self, row: _Row, budget: int, report: StepReport, joined: list[_Joined]) -> int:
        """Prefill the next chunk (at most ``budget`` tokens) of a long prompt; returns the tokens used."""
        ids = list(row.request.ids)
        size = min(budget, len(ids) - row.prefilled)
        if size <= 0:
            return 0
        start = row.prefilled
        chunk = torch.tensor([ids[start : start + size]], dtype=torch.long, device=self._device)
        mask = torch.ones((1, start + size), dtype=torch.long, device=self._device)
        positions = torch.arange(start, start + size, device=self._device).unsqueeze(0)
        try:
            out = self._model(
                input_ids=chunk,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=row.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            row.cache = _checked(out.past_key_values)
            row.prefilled += size
            token = self._choose([row], out.logits[:, -1, :])[0] if row.prefilled == len(ids) else None
        except EngineUnsupported:
            raise
        except Exception as exc:  # noqa: BLE001  (policy: a model failure fails the rows of that pass, not the engine)
            self._chunking = None
            self._fail([row], exc, report)
            return size
        report.prefilled_tokens += size
        if token is not None:
            self._chunking = None
            cache, row.cache = row.cache, None
            if not self._advance(row, token, report):
                assert cache is not None
                joined.append(([row], cache, mask))
        return size

    # -- decode -------------------------------------------------------------------------------------------

    def _decode_step(self, report: StepReport) -> None:
        assert self._cache is not None and self._mask is not None
        rows = self._running
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long, device=self._device)
        positions = self._mask.sum(dim=1, keepdim=True)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        try:
            out = self._model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=1,
            )
            tokens = self._choose(rows, out.logits[:, -1, :])
        except Exception as exc:  # noqa: BLE001  (policy: fail this step's rows, keep the engine)
            self._running, self._cache, self._mask = [], None, None
            self._fail(rows, exc, report)
            return
        self._mask = mask
        report.decoded_rows += len(rows)
        self._drop(
            [i for i, (row, token) in enumerate(zip(rows, tokens, strict=True)) if self._advance(row, token, report)]
        )

    def _merge(self, joined: list[_Joined]) -> None:
        for rows, cache, mask in joined:
            if self._cache is None or self._mask is None:
                self._running, self._cache, self._mask = list(rows), cache, mask
                continue
            length = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([_pad_left(self._mask, length, 1), _pad_left(mask, length, 1)], dim=0)
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                (k1, v1), (k2, v2) = _kv(mine), _kv(theirs)
                keys = torch.cat([_pad_left(k1, length, 2), _pad_left(k2, length, 2)], dim=0)
                _set_kv(mine, keys, torch.cat([_pad_left(v1, length, 2), _pad_left(v2, length, 2)], dim=0))
            self._running.extend(rows)

    # -- per-row bookkeeping ------------------------------------------------------------------------------

    def _choose(self, rows: Sequence[_Row], logits: torch.Tensor) -> list[int]:
        """The next token of each row: processors of the model's generation config, then argmax or sampling."""
        scores = logits.to(dtype=torch.float32)
        if self._processors:
            for index, row in enumerate(rows):
                history = torch.tensor([[*row.request.ids, *row.generated]], dtype=torch.long, device=scores.device)
                scores[index : index + 1] = self._processors(history, scores[index : index + 1])  # type: ignore[arg-type]
        chosen = scores.argmax(dim=-1).tolist()
        for index, row in enumerate(rows):
            params = row.request.params
            if params.temperature == 0.0:
                continue
            row_scores = TemperatureLogitsWarper(params.temperature)(None, scores[index : index + 1])  # type: ignore[arg-type]
            if params.top_p < 1.0:
                row_scores = TopPLogitsWarper(params.top_p)(None, row_scores)  # type: ignore[arg-type]
            probs = torch.softmax(row_scores, dim=-1)
            chosen[index] = int(torch.multinomial(probs, 1, generator=row.generator)[0, 0])
        return [int(t) for t in chosen]

    def _advance(self, row: _Row, token: int, report: StepReport) -> bool:
        """Append ``token`` to the row, report its delta and, if it is done, its outcome. True when done."""
        return advance(row, token, self._eos_ids, self._decode, report)

    def _fail(self, rows: Sequence[_Row], exc: Exception, report: StepReport) -> None:
        logger.exception("llm forward pass failed for %d rows", len(rows), exc_info=exc)
        if self._on_error is not None:
            self._on_error(exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = f"generation failed: {type(exc).__name__}: {exc}"[:500]
        report.finished.extend(Finished(row.key, Failure(ErrorCode.MODEL_ERROR, message)) for row in rows)


def _kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise EngineUnsupported(f"cache layer {type(layer).__name__} holds no key/value tensors")
    return keys, values


def _set_kv(layer: object, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys = keys  # type: ignore[attr-defined]
    layer.values = values  # type: ignore[attr-defined]


def _checked(cache: object) -> DynamicCache:
    if not isinstance(cache, DynamicCache) or any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        layers = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        raise EngineUnsupported(
            f"continuous batching needs a DynamicCache of DynamicLayers, got {type(cache).__name__} {layers}"
        )
    return cache


def _select(
    rows: list[_Row], keep: list[int], cache: DynamicCache, mask: torch.Tensor
) -> tuple[list[_Row], DynamicCache, torch.Tensor]:
    if len(keep) == len(rows):
        return rows, cache, mask
    index = torch.tensor(keep, device=mask.device)
    for layer in cache.layers:
        keys, values = _kv(layer)
        _set_kv(layer, keys.index_select(0, index), values.index_select(0, index))
    return [rows[i] for i in keep], cache, mask.index_select(0, index)


def _model_processors(model: torch.nn.Module, device: torch.device) -> LogitsProcessorList:
    """The logits processors ``generate`` would build from the model's generation config (greedy settings:
    sampling warpers are the engine's own, per row)."""
    base = getattr(model, "generation_config", None)
    build = getattr(model, "_get_logits_processor", None)
    if not isinstance(base, GenerationConfig) or build is None:
        return LogitsProcessorList()
    config = GenerationConfig.from_dict(base.to_dict())
    config.do_sample = False
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.min_length = 0
    config.min_new_tokens = None
    try:
        processors: LogitsProcessorList = build(config, input_ids_seq_length=1, device=str(device))
    except Exception:  # private API of transformers: without it, plain logits
        logger.warning("could not build the model's logits processors; using raw logits", exc_info=True)
        return LogitsProcessorList()
    return processors
