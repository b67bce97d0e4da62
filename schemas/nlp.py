"""NLP service (``nlp``): sentiment, embeddings, similarity and zero-shot classification.

Every task takes ``text`` (one) or ``texts`` (a batch, answered as ``{"results": [...]}``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NLP_TASKS = ("sentiment", "embed", "similarity", "classify")
MAX_TEXT_CHARS = 20_000
MAX_TEXTS = 256


class NlpInput(BaseModel):
    """Input of every NLP task: exactly one of ``text`` and ``texts``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    texts: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)
    text_pair: str | None = Field(
        default=None, max_length=MAX_TEXT_CHARS, description="similarity: the text to compare with."
    )
    labels: list[str] | None = Field(
        default=None, min_length=2, max_length=64, description="classify: candidate labels."
    )
    normalize: bool = Field(default=True, description="embed: L2-normalise the vector.")

    @model_validator(mode="after")
    def _one_of_text_or_texts(self) -> NlpInput:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.texts is not None and any(len(t) > MAX_TEXT_CHARS for t in self.texts):
            raise ValueError(f"each of 'texts' must be at most {MAX_TEXT_CHARS} characters")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class SentimentOutput(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    score: float = Field(description="Confidence of the label, 0..1.")
    scores: dict[str, float] | None = None


class EmbedOutput(BaseModel):
    vector: list[float]
    dim: int


class SimilarityOutput(BaseModel):
    score: float = Field(description="Cosine similarity of the two texts' embeddings, -1..1.")


class ClassifyOutput(BaseModel):
    label: str
    labels: list[str] = Field(description="Candidate labels, best first.")
    scores: list[float] = Field(description="Scores of ``labels``, summing to 1.")


class NlpRequest(NlpInput):
    """HTTP body of ``POST /ai/nlp/process``: the task plus its input."""

    task: Literal["sentiment", "embed", "similarity", "classify"]
    cache: bool | None = None

    def to_input(self) -> dict[str, object]:
        return self.model_dump(exclude={"task", "cache"}, exclude_none=True)
