"""The LLM on llama.cpp (``llama-cpp-python``'s low-level bindings): a GGUF model on CPU, continuous batching
over llama.cpp's multi-sequence batches.

``LlamaRunner`` is the ``llm`` service's runner when the runtime is ``llama_cpp`` (``agents.llm.build_runner``
chooses: a GGUF file on CPU). It offers what the torch runner offers: ``run_batch`` (the static path, which
drives an engine until its rows are done), ``make_engine``/``row_request`` for the continuous loop, and
``model_for`` (name@sha256[:12] of the GGUF, without loading it). It imports neither torch nor transformers.

``LlamaEngine`` (one llama.cpp context each) runs ONE ``llama_decode`` per ``step`` for every row: the last
token of each running row (one logit each) and, within the prefill budget (``max_prefill_tokens``), prompt
tokens of rows waiting to start, first come first served; a prompt longer than the budget is prefilled over
several steps, so it never stalls the running rows for more than one budget. Each row owns a llama.cpp
sequence (``seq_id``) with its own KV stream (``kv_unified`` off): its cells sit at the positions they would
hold alone, so its attention sums in the same order whatever its neighbours. Sequences are slots, as
``llama-server``'s: a row keeps its id from admission to its end, and a row that finishes leaves its cells in
place; a new row takes the free id whose cells share the longest prefix with its prompt (the chat template's
system prompt, earlier turns of a conversation; the lowest id on a tie) and prefills only the rest. The batch
is laid out in ascending id order: llama.cpp computes a run of consecutive ids as one ubatch, so a free id
between live ones splits a step into one graph per run until a new row takes it (earlier versions moved the
highest row into the gap to keep one ubatch; the copy between streams and the lost prompt cells cost more:
prefill is about 3 ms a token on 2 cores, and 8 busy rows re-prefilled ~40 tokens each instead of ~15).
Beyond what the slots keep, a prompt cache (``PromptCache``, ``llm.prompt_cache_mb``, as ``llama-server``'s
``--cache-ram``) holds a copy of every finished row's cells (``llama_state_seq_get_data``), by their tokens,
least recently used first out: a new row whose prompt shares a longer prefix with a saved entry than with its
slot's cells gets that entry's cells copied into its sequence (``llama_state_seq_set_data``) and prefills the
rest: the previous turns of a conversation, a prompt asked again. Restored cells are the saved ones bit for bit,
so a row's tokens are the same as with the prefill (``tests/test_llm_llama.py``). On the bench's 8 closed-loop
clients, in process at 2 threads: prompt tokens prefilled per request 20.6 -> 6.1, 102 -> 139 tokens/s.
Logits are read as one numpy view ``[rows, vocab]``; greedy rows take the argmax; sampled rows draw in numpy
(temperature, then top-p; top-k off) from their own ``numpy.random.Generator``: seeded with the row's seed,
so a seeded row's text does not depend on its neighbours, or from fresh entropy when unseeded.

Measured on the shipped model (``tests/test_llm_llama.py``): greedy tokens equal llama-cpp-python's own
``Llama`` generating the prompt alone, for rows alone, joining mid-generation, chunk-prefilled and reusing a
finished row's cells. One case rounds differently: many prompts prefilled in ONE step (about 256 prompt tokens
or more in a ubatch of several sequences) gave one of 8 rows another first token (a larger ubatch takes other
matmul kernels); the default budget (``max_prefill_tokens`` 512) allows such a step when a burst arrives.

Per row, as the torch engine (``agents.llm_rows.advance``): ``max_tokens``, EOS (llama.cpp's end-of-generation
tokens), stop strings cut, streaming deltas that hold back a possible stop-string start or half a UTF-8
character, ``deadline_ms`` and ``cancel`` (checked before each step), outcomes ``text``/``tokens``/
``finish_reason``/``prompt_tokens``.

Tokenisation and the chat template come from the GGUF: llama.cpp's tokenizer (special tokens parsed), the
GGUF's ``tokenizer.chat_template`` rendered with Jinja2 as transformers does (SmolLM2's ChatML template when
the file carries none), so the prompt tokens are the torch runtime's (``tests/test_llm_llama.py``).

Context: each row may hold ``context_per_row`` tokens (``max_prompt_tokens`` + ``MAX_NEW_TOKENS``, at most the
model's training context); prompts are truncated from the start to leave room for ``max_tokens`` (the torch
runtime's rule). The KV cache holds ``max_batch`` such rows (f16; for SmolLM2-135M about 23 KB a token,
377 MB for 8 rows of 2048).

What can go wrong: no GGUF (a Hugging Face checkpoint) with the ``llama_cpp`` runtime, or ``llama-cpp-python``
missing: ``ModelUnavailableError`` at ``load``. A corrupt GGUF: ``ModelUnavailableError`` (llama.cpp returns
no model). A failed ``llama_decode`` (non-zero status, or an exception) fails the rows of that pass only
(``model_error``): their sequences are removed, waiting rows and the engine go on. ``add`` and ``cancel`` may be
called from any thread; ``step`` must not run in two threads at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agents.llm_model import SMOLLM2_CHAT_TEMPLATE, ModelSpec, ModelUnavailableError, model_spec
from agents.llm_rows import (
    Finished,
    RowRequest,
    RowState,
    StepReport,
    advance,
    epoch_ms,
    stop_failure,
)
from agents.runner import Failure, Item, Outcome, parse_input, unknown_task
from schemas import ErrorCode
from schemas.llm import LLM_TASKS, MAX_NEW_TOKENS, ChatInput, CompletionInput
from streams.settings import Settings

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"
MAX_DEFAULT_THREADS = 8  # more threads than this rarely help a small model (memory bound)

_backend_lock = threading.Lock()
T = TypeVar("T")
_backend_ready = False


def default_threads() -> int:
    """Threads of llama.cpp when ``llm.threads`` is unset: the cores this process may use minus one, at least 1,
    at most 8. llama.cpp's threads meet at a barrier per operation, and one that is descheduled stalls the
    others: through the pipeline on 2 cores, 2 threads gave 86-91 tokens/s for one sequence on a quiet machine
    (1 thread: 56-58), but 6-17 tokens/s with stalls of 11 s while another process kept a core busy, where 1
    thread held 57-60. Set ``llm.threads`` to the core count on a machine the LLM has to itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, MAX_DEFAULT_THREADS))


def _bindings() -> Any:
    """``llama_cpp`` imported once, its backend initialised and its logging routed to ERROR and above."""
    global _backend_ready
    global _log_callback
    try:
        import llama_cpp
    except ImportError as exc:  # the package is a runtime dependency; a broken install lands here
        raise ModelUnavailableError(f"the llama_cpp runtime needs llama-cpp-python: {exc}") from exc
    with _backend_lock:
        if not _backend_ready:
            _log_callback = llama_cpp.llama_log_callback(_llama_log)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


_log_callback: Any = None  # the ctypes callback must outlive every call llama.cpp makes to it
_llama_logger = logging.getLogger("agents.llm_llama.llama_cpp")


def _llama_log(level: int, text: bytes | None, user_data: object) -> None:
    """llama.cpp's log lines: errors as errors, the rest (its chatty warnings included) at debug."""
    if not text:
        return
    if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5)
        _llama_logger.error("%s", text.decode("utf-8", errors="replace").rstrip())
    elif _llama_logger.isEnabledFor(logging.DEBUG):
        _llama_logger.debug("%s", text.decode("utf-8", errors="replace").rstrip())


class LlamaWeights:
    """A GGUF model loaded by llama.cpp (weights memory-mapped), its vocabulary and chat template."""

    def __init__(self, path: Path) -> None:
        lib = _bindings()
        self._lib = lib
        self.path = path
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ModelUnavailableError(f"llama.cpp could not load {path} (not a GGUF model it supports?)")
        self.model = model
        self.vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(model))
        self.eos_ids = frozenset(t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(self.vocab, t))
        raw = lib.llama_model_chat_template(model, None)
        self.chat_template: str = raw.decode("utf-8") if raw else SMOLLM2_CHAT_TEMPLATE
        self._pieces: dict[int, bytes] = {}
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._piece_lock = threading.Lock()
        self._template: Any = None
        self._special: dict[str, str] = {
            "bos_token": self._token_text(lib.llama_vocab_bos(self.vocab)),
            "eos_token": self._token_text(lib.llama_vocab_eos(self.vocab)),
        }

    def close(self) -> None:
        if self.model:
            self._lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone
            self.close()

    # -- text <-> tokens ------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """llama.cpp's tokens for ``text``; special tokens written in it (``<|im_start|>``) are parsed."""
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            out = (self._lib.llama_token * size)()
            count = int(self._lib.llama_tokenize(self.vocab, data, len(data), out, size, add_special, True))
            if count >= 0:
                return list(out[:count])
            size = -count
        raise RuntimeError("llama_tokenize disagreed with itself about the token count")

    def piece(self, token: int) -> bytes:
        """The bytes of one token (control tokens: none, as ``skip_special_tokens`` does)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        with self._piece_lock:
            buffer = self._piece_buffer
            count = int(self._lib.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False))
            if count < 0:
                buffer = ctypes.create_string_buffer(-count)
                count = int(self._lib.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False))
            piece = buffer.raw[: max(count, 0)]
        self._pieces[token] = piece
        return piece

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (a split UTF-8 character at the end reads as U+FFFD)."""
        pieces = self._pieces
        return b"".join([pieces.get(t) or self.piece(t) for t in ids]).decode("utf-8", errors="replace")

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self._lib.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The GGUF's chat template over ``messages``, generation prompt added (transformers' Jinja2 settings)."""
        if self._template is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return str(self._template.render(messages=messages, add_generation_prompt=True, **self._special))


# -- the engine -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Row(RowState):
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    rng: np.random.Generator | None = None
    seq: int = -1  # the llama.cpp sequence it owns once prefilling starts
    pos: int = 0  # tokens of the row in its sequence
    started: bool = False  # its whole prompt is in the cache (or is in this step's batch)
    grammar: str | None = None  # GBNF of its response_format (schemas.structured), None when unconstrained
    constraint: _Constraint | None = None  # the grammar's llama.cpp sampler, made when the row takes a sequence


class _Constraint:
    """A row's grammar as llama.cpp's grammar sampler: which tokens may come next (structured outputs).

    ``choose`` picks the row's next token inside the grammar: a row first asks whether the token it would take
    unconstrained (its argmax, or its draw) is allowed (one candidate: the common case inside a JSON string or
    number costs next to nothing) and only otherwise masks the whole vocabulary and takes the masked argmax, or
    draws again from the masked distribution. For a sampled row that is rejection sampling: a draw from p kept
    when allowed, else a draw from p restricted to the allowed set, is a draw from that restricted set with
    probabilities p(t) / p(allowed), exactly the masked distribution (with ``top_p`` below 1 the first draw's
    nucleus is the unconstrained one, as in llama.cpp's own sampler). Each chosen token is accepted into the
    grammar's state. Used on the engine's thread only; ``close`` frees it."""

    def __init__(self, lib: Any, vocab: Any, grammar: str, n_vocab: int) -> None:
        self._lib = lib
        self._n_vocab = n_vocab
        self._sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not self._sampler:
            raise ValueError("llama.cpp could not parse the response_format's grammar")
        self._one = (lib.llama_token_data * 1)()
        self._one_array = lib.llama_token_data_array(self._one, 1, -1, False)
        self._all: Any = None
        self._all_view: np.ndarray | None = None

    def choose(self, logits: np.ndarray, row: _Row) -> int:
        if row.rng is None:
            token = int(logits.argmax())
            if not self._allows(token):
                token = int(self._masked(logits).argmax())
        else:
            token = _sample(logits, row)
            if not self._allows(token):
                token = _sample(self._masked(logits), row)
        self._lib.llama_sampler_accept(self._sampler, token)
        return token

    def _allows(self, token: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0
        array = self._one_array
        array.size, array.selected, array.sorted = 1, -1, False
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(array))
        return bool(np.isfinite(self._one[0].logit))

    def _masked(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids at -inf."""
        n = self._n_vocab
        if self._all is None:
            self._all = (self._lib.llama_token_data * n)()
            self._all_view = np.ctypeslib.as_array(self._all)
        view = self._all_view
        assert view is not None
        view["id"] = np.arange(n, dtype=np.int32)
        view["logit"] = logits[:n]
        view["p"] = 0.0
        array = self._lib.llama_token_data_array(self._all, n, -1, False)
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(array))
        masked = np.full(n, -np.inf, dtype=np.float32)
        masked[view["id"][: array.size]] = view["logit"][: array.size]
        return masked

    def close(self) -> None:
        if self._sampler:
            self._lib.llama_sampler_free(self._sampler)
            self._sampler = None


class LlamaEngine:
    """Continuous batching over one llama.cpp context; see the module docstring."""

    def __init__(
        self,
        weights: LlamaWeights,
        *,
        max_batch: int,
        max_prefill_tokens: int,
        context_per_row: int,
        threads: int,
        clock_ms: Callable[[], float] = epoch_ms,
        flash_attn: bool = False,
        prompt_cache_bytes: int = 0,
    ) -> None:
        lib = weights._lib
        self._lib = lib
        self._weights = weights
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.context_per_row = context_per_row
        self._clock_ms = clock_ms
        self._eos_ids = weights.eos_ids
        self._decode = weights.decode
        capacity = max_prefill_tokens + max_batch
        params = lib.llama_context_default_params()
        params.n_ctx = context_per_row * max_batch
        params.n_batch = capacity
        params.n_ubatch = capacity  # one ubatch per step: every row in one graph
        params.n_seq_max = max_batch
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = False  # a stream per sequence: a row's cells sit where they would sit alone
        params.no_perf = True
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lib.llama_init_from_model(weights.model, params)
        if not ctx:
            raise ModelUnavailableError(
                f"llama.cpp could not create a context of {params.n_ctx} tokens for {max_batch} rows"
            )
        self._ctx = ctx
        self._memory = lib.llama_get_memory(ctx)
        # The batch points into numpy arrays this engine owns (filled by slices, never freed by llama.cpp).
        self._tokens = np.zeros(capacity, dtype=np.int32)
        self._positions = np.zeros(capacity, dtype=np.int32)
        self._n_seq = np.ones(capacity, dtype=np.int32)
        self._seq_ids = np.zeros(capacity, dtype=np.int32)
        self._outputs = np.zeros(capacity, dtype=np.int8)
        self._arange = np.arange(context_per_row, dtype=np.int32)
        pointer = ctypes.POINTER(ctypes.c_int32)
        base = self._seq_ids.ctypes.data
        self._seq_pointers = (pointer * capacity)(*[ctypes.cast(base + 4 * i, pointer) for i in range(capacity)])
        batch = lib.llama_batch()
        batch.n_tokens = 0
        batch.token = self._tokens.ctypes.data_as(pointer)
        batch.embd = ctypes.POINTER(ctypes.c_float)()
        batch.pos = self._positions.ctypes.data_as(pointer)
        batch.n_seq_id = self._n_seq.ctypes.data_as(pointer)
        batch.seq_id = ctypes.cast(self._seq_pointers, ctypes.POINTER(pointer))
        batch.logits = self._outputs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = batch
        self._lock = threading.Lock()
        self._incoming: list[_Row] = []
        self._cancelled: set[str] = set()
        self._waiting: deque[_Row] = deque()
        self._live: dict[int, _Row] = {}  # sequence id -> the row holding it (prefilling, then running)
        self._kept: dict[int, np.ndarray] = {}  # a free sequence -> the tokens its cells still hold
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.steps = 0

    def close(self) -> None:
        """Free the llama.cpp context (its KV cache); the engine is unusable afterwards."""
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone
            self.close()

    # -- the owner's side ---------------------------------------------------------------------------------

    def add(self, request: RowRequest) -> None:
        """Queue a row; it is prefilled by a coming step (thread-safe)."""
        params = request.params
        rng = np.random.default_rng(params.seed) if params.temperature > 0.0 else None
        row = _Row(request, ids=np.asarray(request.ids, dtype=np.int32), rng=rng, grammar=request.grammar)
        with self._lock:
            self._incoming.append(row)

    def cancel(self, key: str) -> None:
        """Stop the row ``key`` at the next step, answered ``cancelled`` (thread-safe; unknown keys are ignored)."""
        with self._lock:
            self._cancelled.add(key)

    @property
    def active(self) -> int:
        """Rows added and not yet finished."""
        with self._lock:
            incoming = len(self._incoming)
        return incoming + len(self._waiting) + len(self._live)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch - self.active)

    def step(self) -> StepReport:
        """One ``llama_decode``: one token for every running row and prompt tokens within the budget."""
        report = StepReport()
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            cancelled, self._cancelled = self._cancelled, set()
        self._retire(report, cancelled)
        decoding, with_logits, chunks, count = self._fill(report)
        self.steps += 1
        if count == 0:
            return report
        self._batch.n_tokens = count
        try:
            status: object = self._lib.llama_decode(self._ctx, self._batch)
        except Exception as exc:  # noqa: BLE001  (policy: a model failure fails the rows of that pass)
            status = exc
        if status != 0:
            self._fail_pass(report, [*decoding, *(row for row, _ in chunks)], status)
            return report
        report.decoded_rows += len(decoding)
        report.prefilled_tokens += sum(size for _, size in chunks)
        for row in decoding:
            row.pos += 1  # its last token is in the cache now
        for row, size in chunks:
            row.pos += size
        logits = np.ctypeslib.as_array(
            self._lib.llama_get_logits(self._ctx), shape=(len(with_logits), self._weights.n_vocab)
        )
        chosen = logits.argmax(axis=1).tolist()
        done: list[_Row] = []
        for index, row in enumerate(with_logits):
            if row.constraint is not None:
                token = row.constraint.choose(logits[index], row)
            else:
                token = chosen[index] if row.rng is None else _sample(logits[index], row)
            if advance(row, token, self._eos_ids, self._decode, report):
                done.append(row)
        for row in done:
            self._release(row, keep=True)
        return report

    # -- internals ------------------------------------------------------------------------------------------

    def _retire(self, report: StepReport, cancelled: set[str]) -> None:
        """Cancelled rows and rows past their deadline leave, wherever they are."""
        now = self._clock_ms()

        def stopped(row: _Row) -> Failure | None:
            return stop_failure(row, cancelled, now)

        gone: list[tuple[_Row, Failure]] = []
        for row in [*self._waiting, *self._live.values()]:
            failure = stopped(row)
            if failure is not None:
                gone.append((row, failure))
        if not gone:
            return
        ids = {id(row) for row, _ in gone}
        self._waiting = deque(row for row in self._waiting if id(row) not in ids)
        for row, failure in gone:
            report.finished.append(Finished(row.key, failure))
            self._release(row)

    def _fill(self, report: StepReport) -> tuple[list[_Row], list[_Row], list[tuple[_Row, int]], int]:
        """Write this step's tokens into the batch, in ascending sequence order (llama.cpp puts a run of
        consecutive ids in one ubatch): each running row's last token, and prompt chunks within the budget,
        first come first served (a row takes its sequence when its prefill starts, so every live sequence has
        tokens in every batch). Returns the running rows, the rows with a logit (in batch order), the prompt
        chunks and the token count."""
        budget = self.max_prefill_tokens
        sizes: dict[int, int] = {}
        partial = next((row for row in self._live.values() if not row.started), None)  # at most one
        if partial is not None:
            size = min(budget, len(partial.ids) - partial.pos)
            sizes[id(partial)] = size
            budget -= size
        while budget > 0 and self._waiting and len(self._live) < self.max_batch:
            row = self._waiting.popleft()
            need = len(row.ids) + row.request.params.max_tokens
            if len(row.ids) == 0 or need > self.context_per_row:
                message = (
                    f"the prompt ({len(row.ids)} tokens) and max_tokens ({row.request.params.max_tokens}) do not "
                    f"fit the {self.context_per_row} tokens a row may hold"
                )
                report.finished.append(Finished(row.key, Failure(ErrorCode.INVALID_INPUT, message)))
                continue
            if row.grammar is not None:
                try:
                    row.constraint = _Constraint(self._lib, self._weights.vocab, row.grammar, self._weights.n_vocab)
                except ValueError as exc:
                    report.finished.append(Finished(row.key, Failure(ErrorCode.INVALID_INPUT, str(exc))))
                    continue
            row.seq, kept_shared = self._free_seq(row.ids)
            self._live[row.seq] = row
            self._restore(row, kept_shared)
            row.pos = self._reuse(row)
            size = min(budget, len(row.ids) - row.pos)
            sizes[id(row)] = size
            budget -= size
        tokens, positions, seqs, outputs = self._tokens, self._positions, self._seq_ids, self._outputs
        decoding: list[_Row] = []
        with_logits: list[_Row] = []
        chunks: list[tuple[_Row, int]] = []
        count = 0
        for seq in sorted(self._live):
            row = self._live[seq]
            if row.started:
                tokens[count] = row.generated[-1]
                positions[count] = row.pos
                seqs[count] = row.seq
                outputs[count] = 1
                count += 1
                decoding.append(row)
                with_logits.append(row)
                continue
            size = sizes.get(id(row), 0)
            start, end = row.pos, count + size
            tokens[count:end] = row.ids[start : start + size]
            positions[count:end] = self._arange[start : start + size]
            seqs[count:end] = row.seq
            outputs[count:end] = 0
            if start + size == len(row.ids):
                outputs[end - 1] = 1
                row.started = True
                with_logits.append(row)
            chunks.append((row, size))
            count = end
        return decoding, with_logits, chunks, count

    def _fail_pass(self, report: StepReport, rows: list[_Row], status: object) -> None:
        detail = f"{type(status).__name__}: {status}" if isinstance(status, Exception) else f"status {status}"
        logger.error("llama_decode failed (%s) for %d rows", detail, len(rows))
        message = f"generation failed: llama_decode {detail}"[:500]
        for row in rows:
            report.finished.append(Finished(row.key, Failure(ErrorCode.MODEL_ERROR, message)))
            self._release(row)

    def _free_seq(self, ids: np.ndarray) -> tuple[int, int]:
        """The free sequence whose kept cells share the longest prefix with ``ids`` (the lowest on a tie), and
        how many tokens they share."""
        best, best_shared = -1, -1
        for seq in range(self.max_batch):
            if seq in self._live:
                continue
            kept = self._kept.get(seq)
            shared = 0 if kept is None else _shared_prefix(kept, ids)
            if shared > best_shared:
                best, best_shared = seq, shared
        return best, max(best_shared, 0)

    def _restore(self, row: _Row, kept_shared: int) -> None:
        """When the prompt cache holds a longer prefix of the row's prompt than its sequence's kept cells, put
        those saved cells in the sequence instead (``llama_state_seq_set_data``: a copy, no computation)."""
        cache = self.prompt_cache
        if cache is None:
            return
        saved, shared = cache.best(row.ids)
        if saved is None or shared < kept_shared + MIN_RESTORE_GAIN:
            return
        lib, seq = self._lib, row.seq
        lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._kept.pop(seq, None)
        if lib.llama_state_seq_set_data(self._ctx, saved.state, saved.size, seq) == 0:
            logger.warning("restoring %d saved prompt tokens failed; prefilling them", len(saved.tokens))
            lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
            cache.drop(saved)
            return
        self._kept[seq] = saved.tokens
        cache.restored += 1

    def _save(self, seq: int, tokens: np.ndarray) -> None:
        """Keep a copy of the cells of ``seq`` (holding ``tokens``) in the prompt cache."""
        cache = self.prompt_cache
        if cache is None or len(tokens) < MIN_SAVED_TOKENS or cache.holds(tokens):
            return
        lib = self._lib
        size = int(lib.llama_state_seq_get_size(self._ctx, seq))
        if size <= 0 or size > cache.budget:
            return
        state = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data(self._ctx, state, size, seq) != size:
            return
        cache.put(tokens, state, size)

    def _reuse(self, row: _Row) -> int:
        """Prompt tokens of ``row`` its sequence already holds (what the row that finished there shares with
        the prompt); the rest of those cells is removed."""
        kept = self._kept.pop(row.seq, None)
        if kept is None:
            return 0
        shared = _shared_prefix(kept, row.ids)
        if not self._lib.llama_memory_seq_rm(self._memory, row.seq, shared, -1):
            self._lib.llama_memory_seq_rm(self._memory, row.seq, -1, -1)
            return 0
        return shared

    def _release(self, row: _Row, *, keep: bool = False) -> None:
        """Free the row's sequence. ``keep`` (a row that finished): its cells stay for the next row that takes
        the sequence (``_reuse``); otherwise (cancelled, failed, past its deadline) they are removed."""
        if row.constraint is not None:
            row.constraint.close()
            row.constraint = None
        seq = row.seq
        if seq < 0:
            return
        del self._live[seq]
        row.seq = -1
        if keep:
            tokens = np.concatenate([row.ids, np.asarray(row.generated, dtype=np.int32)])[: row.pos]
            self._kept[seq] = tokens
            self._save(seq, tokens)
        else:
            self._kept.pop(seq, None)
            self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)


MIN_RESTORE_GAIN = 8  # saved cells replace a sequence's own only when they spare this many more prompt tokens
MIN_SAVED_TOKENS = 16  # shorter rows are not worth a copy


@dataclass(slots=True, eq=False)
class _Saved:
    tokens: np.ndarray
    state: Any  # ctypes uint8 array from llama_state_seq_get_data
    size: int


class PromptCache:
    """The KV cells of finished rows, by their tokens: least recently used first out past ``budget`` bytes.

    ``best(ids)`` is the entry sharing the longest prefix with ``ids``; an entry whose tokens start another
    entry's (an earlier turn of the same conversation) is dropped when the longer one is saved. Used only on
    the engine's thread (no lock)."""

    def __init__(self, budget: int, max_entries: int = 256) -> None:
        self.budget = budget
        self.max_entries = max_entries
        self.bytes = 0
        self.restored = 0
        self._entries: OrderedDict[bytes, _Saved] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, tokens: np.ndarray) -> bool:
        """Whether ``tokens`` are saved already (the entry counts as used)."""
        key = tokens.tobytes()
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        return False

    def best(self, ids: np.ndarray) -> tuple[_Saved | None, int]:
        best: _Saved | None = None
        best_shared = 0
        for saved in self._entries.values():
            shared = _shared_prefix(saved.tokens, ids)
            if shared > best_shared:
                best, best_shared = saved, shared
        if best is not None:
            self._entries.move_to_end(best.tokens.tobytes())
        return best, best_shared

    def put(self, tokens: np.ndarray, state: Any, size: int) -> None:
        for key, saved in list(self._entries.items()):
            if len(saved.tokens) < len(tokens) and np.array_equal(saved.tokens, tokens[: len(saved.tokens)]):
                self._remove(key)
        self._entries[tokens.tobytes()] = _Saved(tokens, state, size)
        self.bytes += size
        while self._entries and (self.bytes > self.budget or len(self._entries) > self.max_entries):
            self._remove(next(iter(self._entries)))

    def drop(self, saved: _Saved) -> None:
        self._remove(saved.tokens.tobytes())

    def _remove(self, key: bytes) -> None:
        saved = self._entries.pop(key, None)
        if saved is not None:
            self.bytes -= saved.size


def _shared_prefix(kept: np.ndarray, ids: np.ndarray) -> int:
    """How many leading tokens of ``ids`` equal ``kept``'s, leaving at least one to prefill (its logits start
    the row)."""
    limit = min(len(kept), len(ids) - 1)
    differs = np.flatnonzero(kept[:limit] != ids[:limit])
    return int(differs[0]) if len(differs) else max(limit, 0)


def _sample(logits: np.ndarray, row: _Row) -> int:
    """One token drawn from ``softmax(logits / temperature)`` cut to the top-p mass, with the row's generator."""
    params = row.request.params
    assert row.rng is not None
    scores = logits.astype(np.float64) / params.temperature
    scores -= scores.max()
    probs = np.exp(scores)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = min(int(np.searchsorted(cumulative, params.top_p)) + 1, len(order))
        candidates = order[:keep]
        weights = probs[candidates]
    else:
        candidates = None
        weights = probs
    cumulative = np.cumsum(weights)
    drawn = int(np.searchsorted(cumulative, row.rng.random() * cumulative[-1], side="right"))
    drawn = min(drawn, len(weights) - 1)
    return int(candidates[drawn]) if candidates is not None else drawn


# -- the runner -------------------------------------------------------------------------------------------


class LlamaRunner:
    """``ModelRunner`` for the ``llm`` service on llama.cpp; ``agents.llm.build_runner`` builds it."""

    service = "llm"
    tasks: tuple[str, ...] = LLM_TASKS
    runtime = "llama_cpp"

    def __init__(self, settings: Settings, clock_ms: Callable[[], float] = epoch_ms) -> None:
        self._settings = settings
        self._llm = settings.llm
        self._clock_ms = clock_ms  # epoch ms, compared with ``Item.deadline_ms``
        self._lock = threading.Lock()
        self._static_lock = threading.Lock()
        self._spec: ModelSpec | None = None
        self._weights: LlamaWeights | None = None
        self._static: LlamaEngine | None = None
        self.threads = self._llm.threads or default_threads()
        self.context_per_row = self._llm.max_prompt_tokens + MAX_NEW_TOKENS
        self.load_seconds: float | None = None
        self.last_steps = 0  # engine steps of the last run_batch (a figure for tests and benchmarks)
        # Every llama.cpp computation of this runner (warm-up, engines, steps) runs on ONE thread, ``executor``
        # (the continuous loop steps on it too): ggml is built with OpenMP, whose runtime keeps a team of worker
        # threads per calling thread, and a decode called from a second thread ran at about half speed at 2
        # threads (8.4 ms a step when one thread did everything; 15-19 ms once another thread had decoded).
        self._compute_ident: int | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama", initializer=self._mark)

    def _mark(self) -> None:
        self._compute_ident = threading.get_ident()

    def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the runner's compute thread (``executor``), called at once when already on it."""
        if threading.get_ident() == self._compute_ident:
            return fn(*args)
        return self.executor.submit(fn, *args).result()

    # -- ModelRunner ------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the GGUF (memory-mapped; no conversion) and warm up one engine. Idempotent."""
        with self._lock:
            if self._weights is not None:
                return
            started = time.perf_counter()
            spec = self._resolve_spec()
            if spec.gguf is None:
                raise ModelUnavailableError(
                    f"the llama_cpp runtime runs GGUF files; {spec.location!r} is a Hugging Face checkpoint "
                    "(set AISEMBLE_LLM__RUNTIME=torch, or auto)"
                )
            weights = LlamaWeights(spec.gguf)
            if weights.n_ctx_train > 0:
                self.context_per_row = min(self.context_per_row, weights.n_ctx_train)
            self._weights = weights
            self.compute(self._warm_up)
            self.load_seconds = time.perf_counter() - started
            logger.info(
                "llm model %s on llama.cpp (%d threads, %d rows of %d tokens) ready in %.1fs",
                spec.label,
                self.threads,
                self._llm.max_batch,
                self.context_per_row,
                self.load_seconds,
            )

    def model_for(self, task: str) -> str:
        return self._resolve_spec().label

    @property
    def compiled(self) -> bool:
        """Never: ``llm.compile`` is a torch setting."""
        return False

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        """The static path: every valid item becomes a row of one engine, stepped until all are done (on the
        compute thread)."""
        self._ready()
        return self.compute(self._run_batch, items)

    def _run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        requests: list[RowRequest] = []
        for index, item in enumerate(items):
            request = self.row_request(str(index), item)
            if isinstance(request, Failure):
                outcomes[index] = request
            else:
                requests.append(request)
        if requests:
            with self._static_lock:
                if self._static is None:
                    self._static = self.make_engine()
                engine = self._static
                for request in requests:
                    engine.add(request)
                pending = {request.key for request in requests}
                steps = 0
                while pending:
                    report = engine.step()
                    steps += 1
                    for finished in report.finished:
                        outcomes[int(finished.key)] = finished.outcome
                        pending.discard(finished.key)
                    if pending and engine.active == 0:
                        raise RuntimeError(f"llm engine dropped rows {sorted(pending)}")
                self.last_steps = steps
        if any(outcome is None for outcome in outcomes):
            raise RuntimeError("llm runner left an item without an outcome")
        return [outcome for outcome in outcomes if outcome is not None]

    # -- continuous batching ------------------------------------------------------------------------

    @property
    def continuous(self) -> bool:
        """Whether the agent should run the continuous loop over ``make_engine()`` (``llm.batching``)."""
        return self._llm.batching == "continuous"

    def make_engine(self) -> LlamaEngine:
        """A fresh engine (its own llama.cpp context and KV cache) over the loaded weights, made on the compute
        thread; step it there too (``executor``)."""
        weights = self._ready()
        return self.compute(self._new_engine, weights)

    def _new_engine(self, weights: LlamaWeights) -> LlamaEngine:
        return LlamaEngine(
            weights,
            max_batch=self._llm.max_batch,
            max_prefill_tokens=self._llm.max_prefill_tokens,
            context_per_row=self.context_per_row,
            threads=self.threads,
            clock_ms=self._clock_ms,
            prompt_cache_bytes=self._llm.prompt_cache_mb * 1024 * 1024,
        )

    def row_request(self, key: str, item: Item, *, stream: bool = False) -> RowRequest | Failure:
        """``item`` validated and tokenised for the engine (a ``Failure`` for that item otherwise)."""
        if item.task not in self.tasks:
            return unknown_task(item.task, self.tasks)
        weights = self._ready()
        parsed: CompletionInput | ChatInput | Failure = (
            parse_input(ChatInput, item.input) if item.task == "chat" else parse_input(CompletionInput, item.input)
        )
        if isinstance(parsed, Failure):
            return parsed
        try:
            ids = self.encode(weights, parsed)
        except Exception as exc:
            logger.exception("could not tokenise an item of task %s", item.task)
            return Failure(ErrorCode.MODEL_ERROR, f"tokenisation failed: {type(exc).__name__}")
        if not ids:
            return Failure(ErrorCode.INVALID_INPUT, "the prompt has no tokens")
        return RowRequest(key, ids, parsed, item.deadline_ms, stream, parsed.grammar)

    # -- internals --------------------------------------------------------------------------------

    def encode(self, weights: LlamaWeights, request: CompletionInput | ChatInput) -> list[int]:
        """The prompt's tokens after the chat template and truncation (kept: the end)."""
        if isinstance(request, ChatInput):
            text = weights.render_chat([m.model_dump() for m in request.messages])
            ids = weights.tokenize(text, add_special=False)
        elif self._llm.chat_template:
            ids = weights.tokenize(
                weights.render_chat([{"role": "user", "content": request.prompt}]), add_special=False
            )
        else:
            ids = weights.tokenize(request.prompt, add_special=True)
        limit = max(1, min(self._llm.max_prompt_tokens, self.context_per_row - request.max_tokens))
        return ids[-limit:]

    def weights(self) -> LlamaWeights:
        """The loaded model (loads it first when needed)."""
        return self._ready()

    def _resolve_spec(self) -> ModelSpec:
        if self._spec is None:
            self._spec = model_spec(self._settings)
        return self._spec

    def _ready(self) -> LlamaWeights:
        if self._weights is None:
            self.load()
        assert self._weights is not None
        return self._weights

    def _warm_up(self) -> None:
        assert self._weights is not None
        request = CompletionInput(prompt=WARMUP_PROMPT, max_tokens=2, temperature=0.0)
        engine = self.make_engine()
        try:
            engine.add(RowRequest("warm-up", self.encode(self._weights, request), request))
            finished = [f for _ in range(4) for f in engine.step().finished]
        finally:
            engine.close()
        if not finished or isinstance(finished[0].outcome, Failure):
            raise RuntimeError(f"llm engine warm-up failed: {finished}")
