"""The ``nlp`` service's model runner: sentiment, embeddings, similarity and zero-shot classification.

``build_runner(settings)`` returns an ``NlpRunner`` (the ``agents.runner.ModelRunner`` protocol). One
micro-batch is answered with as few model calls as possible: every text that needs a vector (embed,
similarity, classify, and sentiment when the backend votes with embeddings) across all items of the
batch goes through one deduplicated, length-sorted encoder pass, and every sentiment text through one
sentiment call; the results are then split back per item.

Tasks (input ``schemas.nlp.NlpInput``; a ``texts`` batch is answered as ``{"results": [...]}``):

* ``sentiment`` -> ``SentimentOutput``. Default backend: a logistic head on the encoder's vectors plus
  VADER, trained at load time on the reviews the package ships and cached under ``cache_dir``
  (``agents.nlp_sentiment.HeadSentiment``; trained on whichever encoder ``nlp.embed_model`` names);
  ``nlp.sentiment_model`` selects a Hugging Face classifier instead.
* ``embed`` -> ``EmbedOutput``: the mean-pooled vector, L2-normalised when ``normalize`` (the default).
* ``similarity`` -> ``SimilarityOutput``: cosine of ``text`` (or each of ``texts``) with ``text_pair``.
* ``classify`` -> ``ClassifyOutput``: softmax over the cosines of the text with
  ``"This text is about {label}."`` for each label, at temperature ``CLASSIFY_TEMPERATURE``.

Guarantees: ``run_batch`` returns exactly one outcome per item, in order. An item with bad input gets
``Failure("invalid_input", "<field>: <why>")`` and an unknown task ``Failure("unknown_task", ...)``
without touching the others. If a model call raises on the batch (or returns NaN or infinity), the items
are re-run one by one so that only the items that still fail get ``Failure("model_error", ...)``.
``load`` raises when a model cannot be loaded or the warm-up batch fails, so a broken service never
starts consuming (training the sentiment head when it is not cached adds one encoder pass over ~1,000
short reviews: ~2 s with the shipped MiniLM on an idle 2-core CPU). Everything is blocking and runs on
the CPU; call it from a worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agents.nlp_models import Encoder, HfSentiment, SentimentModel, TransformerEncoder, unit
from agents.nlp_sentiment import HeadSentiment
from agents.runner import Failure, Item, Outcome, parse_input, unknown_task
from schemas import ErrorCode
from schemas.nlp import NLP_TASKS, ClassifyOutput, EmbedOutput, NlpInput, SimilarityOutput
from streams.settings import NlpSettings, Settings

log = logging.getLogger(__name__)

HYPOTHESIS = "This text is about {label}."
# MiniLM cosines of a text with two label hypotheses typically differ by 0.05..0.3; at 0.05 a gap of
# 0.1 is a 7:1 odds ratio, so a clear topic scores ~0.8-0.95 and an unclear one stays near uniform.
CLASSIFY_TEMPERATURE = 0.05
MAX_ERROR_CHARS = 300

WARM_UP: tuple[Item, ...] = (
    Item("sentiment", {"texts": ["Warm-up: it works well.", "Warm-up: it broke."]}),
    Item("embed", {"text": "Warm-up sentence for the encoder."}),
    Item("similarity", {"text": "a cat", "text_pair": "a kitten"}),
    Item("classify", {"text": "The match ended two to one.", "labels": ["sports", "cooking"]}),
)


@dataclass(frozen=True, slots=True)
class _Job:
    """A validated item: its task, its input and its texts."""

    task: str
    input: NlpInput
    texts: list[str]


class NlpRunner:
    """The ``nlp`` service's ``ModelRunner``.

    Args:
        settings: the service's settings (models, threads).
        cache_dir: where the trained sentiment head is cached (``Settings.cache_dir``); ``None`` = none.
        encoder: an already loaded encoder, instead of the one ``settings`` names (tests).
        sentiment: an already loaded sentiment backend, instead of the one ``settings`` names (tests).
    """

    service = "nlp"
    tasks: tuple[str, ...] = NLP_TASKS

    def __init__(
        self,
        settings: NlpSettings,
        *,
        cache_dir: Path | None = None,
        encoder: Encoder | None = None,
        sentiment: SentimentModel | None = None,
    ) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self._encoder = encoder
        self._sentiment = sentiment

    # --- lifecycle ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the encoder and the sentiment backend, then run a warm-up batch; raises on failure."""
        start = time.perf_counter()
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        if self._encoder is None:
            self._encoder = TransformerEncoder(self.settings.embed_model or None)
        if self._sentiment is None:
            self._sentiment = self._load_sentiment(self._encoder)
        for item, outcome in zip(WARM_UP, self.run_batch(WARM_UP), strict=True):
            if isinstance(outcome, Failure):
                raise RuntimeError(f"nlp warm-up {item.task!r} failed: {outcome.code}: {outcome.message}")
        log.info(
            "nlp runner ready in %.1fs: embed=%s sentiment=%s",
            time.perf_counter() - start,
            self.model_for("embed"),
            self.model_for("sentiment"),
        )

    def _load_sentiment(self, encoder: Encoder) -> SentimentModel:
        if self.settings.sentiment_model:
            return HfSentiment(self.settings.sentiment_model)
        return HeadSentiment(encoder, self.cache_dir)

    def model_for(self, task: str) -> str:
        """``name@version`` of the model serving ``task``; needs ``load()`` first.

        Raises:
            ValueError: ``task`` is not one of ``tasks``.
            RuntimeError: the runner is not loaded.
        """
        if task not in self.tasks:
            raise ValueError(f"unknown nlp task {task!r}")
        encoder, sentiment = self._models()
        if task == "sentiment":
            return sentiment.model_name
        return f"{encoder.name}@{encoder.version}"

    def _models(self) -> tuple[Encoder, SentimentModel]:
        if self._encoder is None or self._sentiment is None:
            raise RuntimeError("NlpRunner.load() has not run")
        return self._encoder, self._sentiment

    # --- batches -----------------------------------------------------------------------------------

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per item, in order; see the module docstring for the failure policy."""
        outcomes: list[Outcome] = []
        pending: list[tuple[int, _Job]] = []
        for index, item in enumerate(items):
            parsed = self._parse(item)
            outcomes.append(parsed if isinstance(parsed, Failure) else {})
            if isinstance(parsed, _Job):
                pending.append((index, parsed))
        if not pending:
            return outcomes
        jobs = [job for _, job in pending]
        try:
            results = self._compute(jobs)
        except Exception as exc:
            log.exception("nlp batch of %d items failed in the model", len(jobs))
            # Alone, an item's failure is its own; in a batch, find out which items fail alone.
            results = [_model_error(exc)] if len(jobs) == 1 else [self._compute_alone(job) for job in jobs]
        for (index, _), result in zip(pending, results, strict=True):
            outcomes[index] = result
        return outcomes

    def _parse(self, item: Item) -> _Job | Failure:
        if item.task not in self.tasks:
            return unknown_task(item.task, self.tasks)
        parsed = parse_input(NlpInput, item.input)
        if isinstance(parsed, Failure):
            return parsed
        if item.task == "similarity" and parsed.text_pair is None:
            return Failure(ErrorCode.INVALID_INPUT, "text_pair: required for task 'similarity'")
        if item.task == "classify":
            if parsed.labels is None:
                return Failure(ErrorCode.INVALID_INPUT, "labels: required for task 'classify'")
            if len(set(parsed.labels)) != len(parsed.labels):
                return Failure(ErrorCode.INVALID_INPUT, "labels: must be distinct")
        return _Job(item.task, parsed, parsed.all_texts())

    def _compute_alone(self, job: _Job) -> Outcome:
        try:
            return self._compute([job])[0]
        except Exception as exc:
            log.exception("nlp %s item failed in the model", job.task)
            return _model_error(exc)

    def _compute(self, jobs: Sequence[_Job]) -> list[Outcome]:
        encoder, sentiment = self._models()

        # Every text that needs a vector, once, in one encoder pass.
        rows: dict[str, int] = {}

        def need(text: str) -> None:
            rows.setdefault(text, len(rows))

        for job in jobs:
            if job.task == "sentiment" and not sentiment.uses_embeddings:
                continue
            for text in job.texts:
                need(text)
            if job.task == "similarity" and job.input.text_pair is not None:
                need(job.input.text_pair)
            if job.task == "classify":
                for label in job.input.labels or ():
                    need(HYPOTHESIS.format(label=label))
        raw = encoder.encode(list(rows)) if rows else np.zeros((0, encoder.dim), dtype=np.float32)
        if raw.shape != (len(rows), encoder.dim):
            raise RuntimeError(f"encoder returned shape {raw.shape} for {len(rows)} texts")
        if not np.isfinite(raw).all():
            raise FloatingPointError("encoder returned non-finite values")
        units = unit(raw)

        # Every sentiment text in one call.
        sentiment_texts = [text for job in jobs if job.task == "sentiment" for text in job.texts]
        sentiments = []
        if sentiment_texts:
            vectors = units[[rows[t] for t in sentiment_texts]] if sentiment.uses_embeddings else None
            sentiments = sentiment.predict(sentiment_texts, vectors)
            if len(sentiments) != len(sentiment_texts):
                raise RuntimeError(f"sentiment returned {len(sentiments)} results for {len(sentiment_texts)}")
        pending_sentiments = iter(sentiments)

        # Token counts of embedded texts (usage in /v1/embeddings), when the encoder can count them.
        counter = getattr(encoder, "count_tokens", None)
        embed_texts = list(dict.fromkeys(t for job in jobs if job.task == "embed" for t in job.texts))
        token_counts = dict(zip(embed_texts, counter(embed_texts), strict=True)) if counter and embed_texts else {}

        results: list[Outcome] = []
        for job in jobs:
            outputs: list[dict[str, object]] = []
            for text in job.texts:
                if job.task == "sentiment":
                    outputs.append(next(pending_sentiments).model_dump())
                elif job.task == "embed":
                    vector = units[rows[text]] if job.input.normalize else raw[rows[text]]
                    embedded = EmbedOutput(vector=vector.tolist(), dim=len(vector), tokens=token_counts.get(text))
                    outputs.append(embedded.model_dump())
                elif job.task == "similarity":
                    assert job.input.text_pair is not None
                    outputs.append(self._similarity(units[rows[text]], units[rows[job.input.text_pair]]))
                else:
                    labels = job.input.labels or []
                    hypotheses = units[[rows[HYPOTHESIS.format(label=label)] for label in labels]]
                    outputs.append(self._classify(units[rows[text]], hypotheses, labels))
            results.append(outputs[0] if job.input.text is not None else {"results": outputs})
        return results

    @staticmethod
    def _similarity(a: np.ndarray, b: np.ndarray) -> dict[str, object]:
        score = float(np.clip(np.dot(a, b), -1.0, 1.0))
        return SimilarityOutput(score=round(score, 6)).model_dump()

    @staticmethod
    def _classify(vector: np.ndarray, hypotheses: np.ndarray, labels: Sequence[str]) -> dict[str, object]:
        logits = (hypotheses @ vector) / CLASSIFY_TEMPERATURE
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        return ClassifyOutput(
            label=labels[order[0]],
            labels=[labels[i] for i in order],
            scores=[round(float(probs[i]), 6) for i in order],
        ).model_dump()


def _model_error(exc: Exception) -> Failure:
    return Failure(ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])


def build_runner(settings: Settings) -> NlpRunner:
    """The ``nlp`` runner for ``settings`` (not loaded yet: the agent calls ``load()`` in a thread)."""
    return NlpRunner(settings.nlp, cache_dir=settings.cache_dir)
