"""The configurable model paths (``nlp.embed_model``, ``nlp.sentiment_model``) with tiny random models.

Each model is built here: a WordPiece tokenizer trained in-process with ``tokenizers``, a 2-layer BERT
with hidden size 32, saved with ``save_pretrained`` and loaded back by the runner through the real
``from_pretrained`` path. Nothing is downloaded. The outputs are random; only their shape is checked.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

from agents.nlp import NlpRunner, build_runner
from agents.nlp_models import map_labels
from agents.runner import Failure, Item
from schemas.nlp import ClassifyOutput, EmbedOutput, SentimentOutput, SimilarityOutput
from streams.settings import NlpSettings, Settings

HIDDEN = 32
MAX_POSITIONS = 64
CORPUS = [
    "The delivery was fast and the product works well.",
    "Terrible service, the food was cold and the staff were rude.",
    "I love this phone, the battery lasts all day.",
    "The hotel room was dirty and noisy.",
    "Kafka consumers read micro-batches from partitions.",
    "This text is about sports, politics, cooking or technology.",
    "Great value, would buy again!",
    "It broke after two days; I want a refund.",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIAL))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_POSITIONS,
    )


def tiny_config(vocab_size: int, **extra: object) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        **extra,
    )


def save_encoder(path: Path) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    BertModel(tiny_config(len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_classifier(path: Path, id2label: dict[int, str]) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(
        len(tokenizer),
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_encoder(tmp_path_factory.mktemp("models") / "tiny-bert")


def loaded(embed_model: Path, sentiment_model: Path | None = None) -> NlpRunner:
    settings = Settings(
        cache_dir=embed_model.parent / "cache",  # the sentiment head trained on the tiny encoder goes here
        nlp=NlpSettings(embed_model=str(embed_model), sentiment_model=str(sentiment_model or ""), threads=1),
    )
    runner = build_runner(settings)
    runner.load()
    return runner


def test_custom_embed_model_is_loaded_from_its_path(tiny_encoder_path: Path) -> None:
    runner = loaded(tiny_encoder_path)
    assert re.fullmatch(r"tiny-bert@[0-9a-f]{12}", runner.model_for("embed"))
    # The default sentiment head is trained at load time on whichever encoder is configured.
    assert re.fullmatch(
        r"head\.[0-9a-f]{8}\.[0-9a-f]{8}\+tiny-bert@[0-9a-f]{12}\+vader@3\.3\.2\+reviews\.[0-9a-f]{8}",
        runner.model_for("sentiment"),
    )
    assert list((tiny_encoder_path.parent / "cache" / "models").glob("sentiment-head-*.npz"))

    long_text = "the delivery was fast " * 200  # far past the 64 positions: truncated, not refused
    outcomes = runner.run_batch(
        [
            Item("embed", {"texts": ["The product works well.", long_text, ""]}),
            Item("embed", {"text": "raw vector", "normalize": False}),
            Item("similarity", {"text": "fast delivery", "text_pair": "slow delivery"}),
            Item("classify", {"text": "Kafka partitions", "labels": ["sports", "technology", "cooking"]}),
            Item("sentiment", {"text": "Great value, would buy again!"}),
        ]
    )
    assert not any(isinstance(o, Failure) for o in outcomes), outcomes
    embeds = [EmbedOutput.model_validate(r) for r in outcomes[0]["results"]]  # type: ignore[index]
    for embed in embeds:
        assert embed.dim == HIDDEN == len(embed.vector)
        assert np.linalg.norm(embed.vector) == pytest.approx(1.0, abs=1e-5)
    assert EmbedOutput.model_validate(outcomes[1]).dim == HIDDEN
    assert -1.0 <= SimilarityOutput.model_validate(outcomes[2]).score <= 1.0
    classified = ClassifyOutput.model_validate(outcomes[3])
    assert sorted(classified.labels) == ["cooking", "sports", "technology"]
    assert sum(classified.scores) == pytest.approx(1.0, abs=1e-4)
    assert SentimentOutput.model_validate(outcomes[4]).label == "positive"


@pytest.mark.parametrize(
    ("id2label", "classes"),
    [
        ({0: "NEGATIVE", 1: "POSITIVE"}, {"positive", "negative"}),
        ({0: "LABEL_0", 1: "LABEL_1"}, {"positive", "negative"}),
        ({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, {"positive", "negative", "neutral"}),
        ({0: "negative", 1: "neutral", 2: "positive"}, {"positive", "negative", "neutral"}),
    ],
)
def test_custom_sentiment_model_is_loaded_from_its_path(
    tiny_encoder_path: Path, tmp_path: Path, id2label: dict[int, str], classes: set[str]
) -> None:
    sentiment_path = save_classifier(tmp_path / "tiny-sentiment", id2label)
    runner = loaded(tiny_encoder_path, sentiment_path)
    assert re.fullmatch(r"tiny-sentiment@[0-9a-f]{12}", runner.model_for("sentiment"))

    texts = ["Great value, would buy again!", "It broke after two days.", "word " * 300]
    outcomes = runner.run_batch(
        [Item("sentiment", {"texts": texts}), Item("sentiment", {"text": "I love this phone."})]
    )
    results = [SentimentOutput.model_validate(r) for r in outcomes[0]["results"]]  # type: ignore[index]
    results.append(SentimentOutput.model_validate(outcomes[1]))
    for result in results:
        assert result.label in classes
        assert result.scores is not None and set(result.scores) == classes
        assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-3)
        assert result.score == max(result.scores.values())


def test_unmappable_sentiment_labels_fail_at_load(tiny_encoder_path: Path, tmp_path: Path) -> None:
    sentiment_path = save_classifier(tmp_path / "emotions", {0: "joy", 1: "anger", 2: "fear"})
    with pytest.raises(ValueError, match="cannot map"):
        loaded(tiny_encoder_path, sentiment_path)


def test_missing_model_path_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        loaded(tmp_path / "does-not-exist")


@pytest.mark.parametrize(
    ("id2label", "expected"),
    [
        ({0: "NEGATIVE", 1: "POSITIVE"}, ["negative", "positive"]),
        ({0: "POSITIVE", 1: "NEGATIVE"}, ["positive", "negative"]),
        ({0: "LABEL_0", 1: "LABEL_1"}, ["negative", "positive"]),
        ({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, ["negative", "neutral", "positive"]),
        ({0: "neg", 1: "neu", 2: "pos"}, ["negative", "neutral", "positive"]),
        (
            {0: "1 star", 1: "2 stars", 2: "3 stars", 3: "4 stars", 4: "5 stars"},
            ["negative", "negative", "neutral", "positive", "positive"],
        ),
    ],
)
def test_map_labels(id2label: dict[int, str], expected: list[str]) -> None:
    assert map_labels(id2label) == expected


@pytest.mark.parametrize(
    "id2label",
    [{0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2", 3: "LABEL_3"}, {0: "positive", 1: "neutral"}, {0: "spam", 1: "ham"}],
)
def test_map_labels_refuses_unknown_conventions(id2label: dict[int, str]) -> None:
    with pytest.raises(ValueError):
        map_labels(id2label)
