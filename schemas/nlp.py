"""NLP service (``nlp``): sentiment, embeddings, similarity and zero-shot classification.

Every task takes ``text`` (one) or ``texts`` (a batch, answered as ``{"results": [...]}``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from schemas.http import WireSafe, one_of_present

NLP_TASKS = ("sentiment", "embed", "similarity", "classify")
MAX_TEXT_CHARS = 20_000
MAX_TEXTS = 256

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class NlpInput(BaseModel):
    """Input of every NLP task: exactly one of ``text`` and ``texts`` (present and not null).

    The rule is in the JSON Schema too (``oneOf``), so generated clients and validators know it.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=one_of_present(
            ("text", {"type": "string", "maxLength": MAX_TEXT_CHARS}),
            (
                "texts",
                {
                    "type": "array",
                    "items": {"type": "string", "maxLength": MAX_TEXT_CHARS},
                    "minItems": 1,
                    "maxItems": MAX_TEXTS,
                },
            ),
        ),
    )

    text: Text | None = None
    texts: list[Text] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)
    text_pair: str | None = Field(
        default=None, max_length=MAX_TEXT_CHARS, description="similarity: the text to compare with."
    )
    labels: list[str] | None = Field(
        default=None, min_length=2, max_length=64, description="classify: candidate labels."
    )
    normalize: StrictBool = Field(default=True, description="embed: L2-normalise the vector.")

    @model_validator(mode="after")
    def _one_of_text_or_texts(self) -> NlpInput:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
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
    tokens: int | None = Field(default=None, description="Tokens of the text as the encoder saw it (after truncation).")


class SimilarityOutput(BaseModel):
    score: float = Field(description="Cosine similarity of the two texts' embeddings, -1..1.")


class ClassifyOutput(BaseModel):
    label: str
    labels: list[str] = Field(description="Candidate labels, best first.")
    scores: list[float] = Field(description="Scores of ``labels``, summing to 1.")


class NlpRequest(NlpInput, WireSafe):
    """HTTP body of ``POST /ai/nlp/process``: the task plus its input; strict types (``"cache": 0`` fails)."""

    model_config = ConfigDict(strict=True)

    task: Literal["sentiment", "embed", "similarity", "classify"]
    cache: bool | None = Field(default=None, description="true: use the result cache; false: bypass it.")

    def to_input(self) -> dict[str, object]:
        return self.model_dump(exclude={"task", "cache"}, exclude_none=True)
