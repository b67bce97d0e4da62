"""Vision service (``vision``): face detection, resizing, smart crop, description and classification.

An image travels inline as base64 (``image_b64``) or, when larger than fits a Kafka message, by claim
check (``image_ref``: a Redis key the edge wrote, with a TTL). Exactly one of the two is given.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.http import BASE64_PATTERN, JsonInt, WireSafe, one_of_present

VISION_TASKS = ("detect_faces", "resize", "smart_crop", "describe", "classify")
VisionTask = Literal["detect_faces", "resize", "smart_crop", "describe", "classify"]


class VisionInput(BaseModel):
    """Input of every vision task: exactly one of ``image_b64`` and ``image_ref`` (present and not null).

    The rule is in the JSON Schema too (``oneOf``).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=one_of_present(
            ("image_b64", {"type": "string"}), ("image_ref", {"type": "string", "maxLength": 200})
        ),
    )

    image_b64: str | None = Field(default=None, description="The encoded image (PNG, JPEG, ...) in base64.")
    image_ref: str | None = Field(default=None, max_length=200, description="Claim-check key in Redis.")
    max_size: int = Field(default=1024, ge=8, le=8192, description="resize: longest side in pixels.")
    width: int | None = Field(default=None, ge=1, le=8192, description="smart_crop: target width.")
    height: int | None = Field(default=None, ge=1, le=8192, description="smart_crop: target height.")
    format: Literal["png", "jpeg", "webp"] = Field(default="png", description="Encoding of output images.")
    top_k: int = Field(default=5, ge=1, le=100, description="classify: labels to return.")
    min_face_size: int = Field(default=30, ge=8, le=4096, description="detect_faces: smallest face side.")

    @model_validator(mode="after")
    def _one_image(self) -> VisionInput:
        if (self.image_b64 is None) == (self.image_ref is None):
            raise ValueError("give exactly one of 'image_b64' or 'image_ref'")
        return self


class Box(BaseModel):
    x: int
    y: int
    w: int
    h: int


class FacesOutput(BaseModel):
    faces: list[Box]
    count: int
    width: int
    height: int


class ImageOutput(BaseModel):
    image_b64: str
    width: int
    height: int
    format: str


class DescribeOutput(BaseModel):
    width: int
    height: int
    channels: int
    mean_color: list[float] = Field(description="Mean R, G, B (0..255).")
    sharpness: float = Field(description="Variance of the Laplacian of the grey image.")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyImageOutput(BaseModel):
    labels: list[LabelScore]


class VisionRequest(WireSafe):
    """HTTP body of ``POST /ai/vision/analyze`` (JSON variant); strict types (``"cache": 0`` fails).

    Only ``image_b64``: an ``image_ref`` is a claim-check key the edge itself writes for large uploads.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    task: VisionTask
    image_b64: str = Field(pattern=BASE64_PATTERN, description="The encoded image (PNG, JPEG, ...) in base64.")
    max_size: JsonInt = Field(default=1024, ge=8, le=8192)
    width: JsonInt | None = Field(default=None, ge=1, le=8192)
    height: JsonInt | None = Field(default=None, ge=1, le=8192)
    format: Literal["png", "jpeg", "webp"] = "png"
    top_k: JsonInt = Field(default=5, ge=1, le=100)
    min_face_size: JsonInt = Field(default=30, ge=8, le=4096)
    cache: bool | None = Field(default=None, description="true: use the result cache; false: bypass it.")
