"""The ``llm`` runner on torch/transformers (runtime ``torch``): a Hugging Face causal LM, or any model on CUDA.

``agents.llm.build_runner`` builds it when ``settings.llm.runtime`` resolves to ``torch`` (a GGUF on CPU runs
on llama.cpp instead: ``agents.llm_llama``).

Two ways to batch, chosen by ``settings.llm.batching``:

* ``continuous``: the agent runs ``agents.loops.continuous.ContinuousLoop`` over ``make_engine()`` (an
  ``agents.llm_engine.DecodeEngine``): rows join and leave between decode steps, and streaming rows report
  their text step by step. ``row_request`` validates and tokenises one item for it. See that module for its
  guarantees (seeded rows use their own generator there, so they are not run alone).
* ``static`` (what this docstring describes from here on): ``run_batch`` groups and calls ``generate``.
  ``run_batch`` is the static path in both modes (benchmarks and the batch loop call it).

``chat`` renders its ``messages`` with the tokenizer's chat template (generation prompt added) and is then
a completion of that text; a model without a chat template answers ``chat`` with ``invalid_input``.
Outputs carry ``prompt_tokens`` (the prompt's tokens as the model saw them, after truncation).

One ``run_batch`` call validates every item, splits the valid ones into generation groups and runs
``model.generate`` once per group, left-padded, with ``max_new_tokens`` = the group's largest
``max_tokens``. Each row is then cut at its own ``max_tokens``, at EOS, or at its first stop string.

Grouping rule (``plan_groups``), which is what makes outputs reproducible:
- greedy requests (``temperature == 0``) share one group whatever their other fields: greedy decoding
  draws no random numbers, so a row's text depends only on its prompt (up to float rounding in padded
  batched matmuls; see ``tests/test_llm_runner.py`` for the check);
- seeded sampled requests each run ALONE, under ``torch.manual_seed(seed)`` inside ``fork_rng``: in a
  shared batch the rows would consume one random stream, so a row's text would depend on its
  neighbours. Alone, the same request gives the same text in any batch;
- unseeded sampled requests are grouped by ``(temperature, top_p)``; they promise nothing;
- rows with vLLM's ``ignore_eos`` or ``min_tokens`` group apart by those two: their group's ``generate`` has
  no EOS (``ignore_eos``) or masks it until ``min_new_tokens`` (``min_tokens``); ``RowStops`` matches no stop
  string before ``min_tokens``, and the cut is ``agents.llm_rows.finish_output``'s, as the engines'.
Groups are split to at most ``settings.llm.max_batch`` rows. Sampling uses exactly ``temperature``
and ``top_p`` (top-k is switched off); other generation defaults of the model (e.g. a repetition
penalty in a hub model's ``generation_config.json``) still apply. The seeded path draws from torch's
global generator: a second thread sampling in the same process at the same moment would break it
(the agent runs one batch at a time).

Finished rows: ``generate`` stops when every row has hit EOS; ``RowStops`` additionally marks a row
done at its own ``max_tokens`` or stop string, so ``generate`` pads it from then on and the whole
group ends as soon as its last row does.

Deadlines: an item's ``deadline_ms`` (epoch ms) is checked when its group starts (already past: the
item is answered ``deadline_exceeded`` without generating) and after every decode step by
``RowStops``: a row whose deadline has passed is marked done at that step (``generate`` pads it from
then on) and answered ``deadline_exceeded``; the other rows of the group go on, and the group ends
when its last row is done or expired. A row that finished (EOS, ``max_tokens``, stop string) before
its deadline passed keeps its output.

``tokens`` counts generated tokens up to the cut: the EOS token when it ended the row, the tokens
that spell the stop string when one did (the stop string itself is cut from ``text``).

Per-item failures: invalid input -> ``invalid_input`` (naming the field); unknown task ->
``unknown_task``; a ``generate`` failure -> ``model_error`` for that group's items only. With
``settings.llm.compile`` the model's ``forward`` is ``torch.compile``d (``dynamic=True``; compiling the
module object would leave ``generate``'s own calls eager); any failure while compiled (at warm-up or
in a batch) is logged, the runner falls back to eager for good and the group is retried once. The
engine calls the same (compiled) ``forward``; a compiled engine warm-up that fails falls back to eager, and
a compiled forward failing in a step answers that step's rows ``model_error`` (no retry) and drops compile.

Device and dtype: see ``agents.llm_model`` (CUDA when available, bf16 or fp16 there, fp32 on CPU).
``settings.llm.threads`` sets torch's CPU threads at load and again in whichever thread runs a batch.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from agents.llm_engine import (
    DecodeEngine,
    EngineUnsupported,
    RowRequest,
    deadline_failure,
    finish_output,
    first_stop,
)
from agents.llm_model import LoadedModel, ModelSpec, ensure_local, load_model, model_spec
from agents.runner import Failure, Item, Outcome, parse_input, unknown_task
from schemas import ErrorCode
from schemas.llm import LLM_TASKS, ChatInput, CompletionInput, SamplingInput
from streams.settings import Settings

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"
DEADLINE = "deadline"  # RowStops.reasons entry of a row stopped by its deadline
_STOP_WINDOW_SLACK = 2  # tokens decoded beyond 4 per stop-string character (UTF-8 is <= 4 bytes/char)


def group_key(request: SamplingInput, index: int) -> tuple[object, ...]:
    """The generation group of one request (see the module docstring for the rule); rows with ``ignore_eos`` or
    ``min_tokens`` group apart by those two (``generate``'s EOS settings are the group's)."""
    fixed: tuple[object, ...] = (
        ("fixed", request.ignore_eos, request.min_tokens) if request.ignore_eos or request.min_tokens else ()
    )
    if request.temperature == 0.0:
        return ("greedy", *fixed)
    if request.seed is not None:
        return ("seeded", index, *fixed)
    return ("sample", request.temperature, request.top_p, *fixed)


def plan_groups(requests: Sequence[SamplingInput], max_batch: int) -> list[list[int]]:
    """Indices of ``requests`` split into generation groups of at most ``max_batch``, in first-seen order."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(group_key(request, index), []).append(index)
    planned: list[list[int]] = []
    for members in groups.values():
        planned.extend(members[i : i + max_batch] for i in range(0, len(members), max_batch))
    return planned


def epoch_ms() -> float:
    """The wall clock in epoch milliseconds (the unit of ``Item.deadline_ms``)."""
    return time.time() * 1000.0


class RowStops(StoppingCriteria):
    """Per-row stopping: a row is done at its own ``max_tokens``, once its output holds a stop string,
    at EOS, or when its deadline (epoch ms, from ``clock_ms``) has passed.

    Returns a bool tensor with one entry per row (transformers >= 4.39), so ``generate`` pads finished
    rows and ends when all are done. Only rows with stop strings decode, and only a tail window long
    enough to hold the longest one. The first reason a row stopped is kept in ``reasons`` (``"eos"``,
    ``"length"``, ``"stop"`` or ``DEADLINE``) with the step in ``stopped_at``; once done, a row stays done.
    """

    def __init__(
        self,
        prompt_len: int,
        max_tokens: Sequence[int],
        stops: Sequence[Sequence[str]],
        decode: _Decode,
        *,
        deadlines: Sequence[float | None] | None = None,
        eos_ids: frozenset[int] = frozenset(),
        clock_ms: Callable[[], float] = epoch_ms,
        min_tokens: Sequence[int] | None = None,
    ) -> None:
        self._prompt_len = prompt_len
        self._min_tokens = list(min_tokens) if min_tokens is not None else [0] * len(max_tokens)
        self._max_tokens = list(max_tokens)
        self._stops = [list(s) for s in stops]
        self._windows = [4 * max((len(s) for s in row), default=0) + _STOP_WINDOW_SLACK for row in stops]
        self._decode = decode
        self._deadlines = list(deadlines) if deadlines is not None else [None] * len(self._max_tokens)
        self._eos_ids = eos_ids
        self._clock_ms = clock_ms
        self.reasons: list[str | None] = [None] * len(self._max_tokens)
        self.stopped_at: list[int | None] = [None] * len(self._max_tokens)
        self.steps = 0

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: object
    ) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self._prompt_len
        self.steps += 1
        last = input_ids[:, -1].tolist() if generated > 0 and self._eos_ids else []
        now: float | None = None
        for row in range(len(self._max_tokens)):
            if self.reasons[row] is not None:
                continue
            reason: str | None = None
            if last and last[row] in self._eos_ids:
                reason = "eos"  # generate finished the row itself; noted so a deadline cannot claim it
            elif generated >= self._max_tokens[row]:
                reason = "length"
            elif self._stops[row] and generated > 0 and generated >= self._min_tokens[row]:
                if self._min_tokens[row] > 1:  # a stop string must end past the first min_tokens - 1 tokens' text
                    ids = input_ids[row, self._prompt_len :].tolist()
                    after = len(self._decode(ids[: self._min_tokens[row] - 1]).rstrip("\ufffd"))
                    if first_stop(self._decode(ids), self._stops[row], after) is not None:
                        reason = "stop"
                else:
                    start = max(self._prompt_len, input_ids.shape[1] - self._windows[row])
                    tail = self._decode(input_ids[row, start:].tolist())
                    if any(stop in tail for stop in self._stops[row]):
                        reason = "stop"
            deadline = self._deadlines[row]
            if reason is None and deadline is not None:
                now = self._clock_ms() if now is None else now
                if now >= deadline:
                    reason = DEADLINE
            if reason is not None:
                self.reasons[row], self.stopped_at[row] = reason, generated
        done = [reason is not None for reason in self.reasons]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _Decode:
    """``tokenizer.decode`` without special tokens (a typed callable for ``RowStops``)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._tokenizer = loaded.tokenizer

    def __call__(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


@dataclass(frozen=True, slots=True)
class _Row:
    index: int
    request: SamplingInput
    ids: list[int]
    deadline_ms: float | None = None


class LlmRunner:
    """``ModelRunner`` for the ``llm`` service; build it with ``build_runner``."""

    service = "llm"
    tasks: tuple[str, ...] = LLM_TASKS
    runtime = "torch"

    def __init__(self, settings: Settings, clock_ms: Callable[[], float] = epoch_ms) -> None:
        self._settings = settings
        self._clock_ms = clock_ms  # epoch ms, compared with ``Item.deadline_ms``
        self._llm = settings.llm
        self._lock = threading.Lock()
        self._spec: ModelSpec | None = None
        self._loaded: LoadedModel | None = None
        self._decode: _Decode | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._use_template = False
        self._compiled = False
        self._engine_unsupported = False
        self.load_seconds: float | None = None
        self.last_steps = 0  # decode steps of the last generation group (a figure for tests and benchmarks)

    # -- ModelRunner ------------------------------------------------------------------------------

    def load(self) -> None:
        """Resolve, convert (first time only), load, optionally compile, and warm up. Idempotent."""
        with self._lock:
            if self._loaded is not None:
                return
            started = time.perf_counter()
            if self._llm.threads is not None:
                torch.set_num_threads(self._llm.threads)
            spec = self._resolve_spec()
            loaded = load_model(ensure_local(spec), self._llm)
            self._decode = _Decode(loaded)
            self._eos_ids = _eos_ids(loaded)
            self._use_template = self._llm.chat_template and bool(loaded.tokenizer.chat_template)
            if self._llm.chat_template and not self._use_template:
                logger.warning("%s has no chat template; prompts are sent raw", spec.label)
            self._loaded = loaded
            if self._llm.compile:
                self._compile()
            self._warm_up()
            self.load_seconds = time.perf_counter() - started
            logger.info(
                "llm model %s on %s/%s ready in %.1fs (compile=%s)",
                spec.label,
                loaded.device,
                loaded.dtype,
                self.load_seconds,
                self._compiled,
            )

    def model_for(self, task: str) -> str:
        return self._resolve_spec().label

    @property
    def compiled(self) -> bool:
        """Whether batches run through the ``torch.compile``d forward (false after a fallback)."""
        return self._compiled

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        loaded = self._ready()
        outcomes: list[Outcome | None] = [None] * len(items)
        rows: list[_Row] = []
        for index, item in enumerate(items):
            if item.task not in self.tasks:
                outcomes[index] = unknown_task(item.task, self.tasks)
                continue
            parsed = self._parse(loaded, item)
            if isinstance(parsed, Failure):
                outcomes[index] = parsed
                continue
            rows.append(_Row(index, parsed[0], parsed[1], item.deadline_ms))
        for group in plan_groups([row.request for row in rows], self._llm.max_batch):
            members = [rows[i] for i in group]
            for row, outcome in zip(members, self._run_group(members), strict=True):
                outcomes[row.index] = outcome
        if any(outcome is None for outcome in outcomes):
            raise RuntimeError("llm runner left an item without an outcome")
        return [outcome for outcome in outcomes if outcome is not None]

    # -- continuous batching ------------------------------------------------------------------------

    @property
    def continuous(self) -> bool:
        """Whether the agent should run the continuous loop over ``make_engine()`` (``llm.batching``)."""
        return self._llm.batching == "continuous" and not self._engine_unsupported

    def make_engine(self) -> DecodeEngine:
        """A fresh step-wise engine over the loaded model (one per agent loop)."""
        loaded = self._ready()
        assert self._decode is not None
        return DecodeEngine(
            loaded.model,
            device=loaded.device,
            eos_ids=self._eos_ids,
            decode=self._decode,
            pad_id=int(loaded.tokenizer.pad_token_id),
            max_batch=self._llm.max_batch,
            max_prefill_tokens=self._llm.max_prefill_tokens,
            clock_ms=self._clock_ms,
            on_error=self._engine_failed,
            threads=self._llm.threads,
        )

    def _engine_failed(self, exc: Exception) -> None:
        """A forward pass of the engine failed: its rows are answered ``model_error``; a compiled forward is
        dropped for good (later steps run eager), as in the static path (which also retries its group)."""
        if self._compiled:
            logger.error("compiled forward failed in the engine (%r); falling back to eager", exc)
            self._uncompile()

    def row_request(self, key: str, item: Item, *, stream: bool = False) -> RowRequest | Failure:
        """``item`` validated and tokenised for the engine (a ``Failure`` for that item otherwise)."""
        if item.task not in self.tasks:
            return unknown_task(item.task, self.tasks)
        parsed = self._parse(self._ready(), item)
        if isinstance(parsed, Failure):
            return parsed
        return RowRequest(key, parsed[1], parsed[0], item.deadline_ms, stream)

    # -- internals --------------------------------------------------------------------------------

    def _parse(self, loaded: LoadedModel, item: Item) -> tuple[SamplingInput, list[int]] | Failure:
        """The item's validated input and prompt ids (after the chat template and truncation)."""
        parsed: CompletionInput | ChatInput | Failure = (
            parse_input(ChatInput, item.input) if item.task == "chat" else parse_input(CompletionInput, item.input)
        )
        if isinstance(parsed, Failure):
            return parsed
        if isinstance(parsed, ChatInput) and not loaded.tokenizer.chat_template:
            return Failure(ErrorCode.INVALID_INPUT, "task chat: the model has no chat template; use completion")
        if parsed.grammar is not None:
            return Failure(
                ErrorCode.INVALID_INPUT,
                "response_format json_object/json_schema needs the llama_cpp runtime (a GGUF model on CPU); "
                "this agent runs torch",
            )
        try:
            return parsed, self._encode(loaded, parsed)
        except Exception as exc:
            logger.exception("could not tokenise an item of task %s", item.task)
            return Failure(ErrorCode.MODEL_ERROR, f"tokenisation failed: {type(exc).__name__}")

    def _resolve_spec(self) -> ModelSpec:
        if self._spec is None:
            self._spec = model_spec(self._settings)
        return self._spec

    def _ready(self) -> LoadedModel:
        if self._loaded is None:
            self.load()
        assert self._loaded is not None
        threads = self._llm.threads
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # OpenMP keeps the count per thread: apply it in this one too
        return self._loaded

    def _encode(self, loaded: LoadedModel, request: CompletionInput | ChatInput) -> list[int]:
        tokenizer = loaded.tokenizer
        if isinstance(request, ChatInput):
            messages = [m.model_dump() for m in request.messages]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
        elif self._use_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": request.prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(request.prompt)["input_ids"])
        limit = self._llm.max_prompt_tokens
        positions = getattr(loaded.model.config, "max_position_embeddings", None)
        if isinstance(positions, int):
            limit = max(1, min(limit, positions - request.max_tokens))
        return ids[-limit:]  # keep the end: the question and the assistant header

    def _run_group(self, rows: list[_Row]) -> list[Outcome]:
        try:
            return self._generate(rows)
        except Exception as exc:
            if self._compiled:
                logger.exception("compiled generate failed; falling back to eager and retrying")
                self._uncompile()
                return self._run_group(rows)
            logger.exception("generate failed for a group of %d", len(rows))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, let the next group start clean
            message = f"generation failed: {type(exc).__name__}: {exc}"[:500]
            return [Failure(ErrorCode.MODEL_ERROR, message) for _ in rows]

    def _generate(self, rows: list[_Row]) -> list[Outcome]:
        now = self._clock_ms()
        late = [row.deadline_ms is not None and now >= row.deadline_ms for row in rows]
        if not any(late):
            return self._generate_live(rows)
        live = self._generate_live([row for row, gone in zip(rows, late, strict=True) if not gone])
        answered = iter(live)
        return [deadline_failure(0) if gone else next(answered) for gone in late]

    def _generate_live(self, rows: list[_Row]) -> list[Outcome]:
        if not rows:
            return []
        loaded = self._ready()
        assert self._decode is not None
        pad_id = int(loaded.tokenizer.pad_token_id)
        width = max(len(row.ids) for row in rows)
        input_ids = torch.tensor([[pad_id] * (width - len(r.ids)) + r.ids for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], dtype=torch.long)
        first = rows[0].request
        stops = RowStops(
            width,
            [r.request.max_tokens for r in rows],
            [r.request.stop or [] for r in rows],
            self._decode,
            deadlines=[r.deadline_ms for r in rows],
            eos_ids=frozenset() if first.ignore_eos else self._eos_ids,
            clock_ms=self._clock_ms,
            min_tokens=[r.request.min_tokens for r in rows],
        )
        config = self._generation_config(loaded, first, max(r.request.max_tokens for r in rows))
        seed = first.seed if first.temperature > 0.0 and len(rows) == 1 else None
        with torch.inference_mode(), _seeded(seed, loaded.device):
            output = loaded.model.generate(  # type: ignore[operator]  # nn.Module attribute typing
                input_ids=input_ids.to(loaded.device),
                attention_mask=mask.to(loaded.device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([stops]),
            )
        generated = output[:, width:].tolist()
        self.last_steps = stops.steps
        outcomes: list[Outcome] = []
        for i, (ids, row) in enumerate(zip(generated, rows, strict=True)):
            if stops.reasons[i] == DEADLINE:
                outcomes.append(deadline_failure(stops.stopped_at[i] or 0))
            else:
                assert self._decode is not None
                outcomes.append(finish_output(ids, row.request, self._eos_ids, self._decode, len(row.ids)))
        return outcomes

    def _generation_config(self, loaded: LoadedModel, request: SamplingInput, max_new: int) -> GenerationConfig:
        config = copy.deepcopy(loaded.model.generation_config)
        config.max_new_tokens = max_new
        config.max_length = None
        config.min_new_tokens = None
        config.min_length = 0
        config.pad_token_id = loaded.tokenizer.pad_token_id
        # ignore_eos: no EOS at all ([]: generate would take None as "unset" and fill in the model's own)
        config.eos_token_id = [] if request.ignore_eos else sorted(self._eos_ids) or None
        if request.min_tokens and not request.ignore_eos:
            config.min_new_tokens = request.min_tokens  # EOS masked until then (vLLM's min_tokens does the same)
        config.num_beams = 1
        if request.temperature == 0.0:
            config.do_sample = False
            config.temperature = None
            config.top_p = None
            config.top_k = None
        else:
            config.do_sample = True
            config.temperature = request.temperature
            config.top_p = request.top_p
            config.top_k = 0  # 0 switches top-k off; None would bring back the library default of 50
        return config

    def _compile(self) -> None:
        assert self._loaded is not None
        model = self._loaded.model
        try:
            model.forward = torch.compile(model.forward, dynamic=True)  # type: ignore[method-assign]
            self._compiled = True
        except Exception:
            logger.exception("torch.compile unavailable; running eager")

    def _uncompile(self) -> None:
        assert self._loaded is not None
        model = self._loaded.model
        if "forward" in vars(model):
            del model.forward
        self._compiled = False

    def _warm_up(self) -> None:
        assert self._loaded is not None
        request = CompletionInput(prompt=WARMUP_PROMPT, max_tokens=2, temperature=0.0)
        row = _Row(0, request, self._encode(self._loaded, request))
        try:
            self._generate([row])
        except Exception:
            if not self._compiled:
                raise
            logger.exception("compiled warm-up failed; falling back to eager")
            self._uncompile()
            self._generate([row])
        if self.continuous:
            self._warm_up_engine(request, row.ids)

    def _warm_up_engine(self, request: CompletionInput, ids: list[int]) -> None:
        """Two engine steps (prefill, decode); a model the engine cannot batch keeps static batching."""
        for attempt in range(2):
            engine = self.make_engine()
            engine.add(RowRequest("warm-up", ids, request.model_copy(update={"max_tokens": 3})))
            try:
                finished = [f for _ in range(4) for f in engine.step().finished]
            except EngineUnsupported as exc:
                logger.warning("continuous batching unavailable for this model (%s); using static batches", exc)
                self._engine_unsupported = True
                return
            if finished and not isinstance(finished[0].outcome, Failure):
                return
            if attempt == 0 and self._compiled:
                logger.error("compiled engine warm-up failed (%s); falling back to eager", finished)
                self._uncompile()
                continue
            raise RuntimeError(f"llm engine warm-up failed: {finished}")


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    configured = loaded.model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(i for i in configured if isinstance(i, int))
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return frozenset(ids)


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run under ``seed`` without disturbing the process's random state; a no-op for ``None``."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
