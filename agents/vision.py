"""The vision service's model runner: face detection, resize, smart crop, describe and classify.

``build_runner(settings)`` gives a ``VisionRunner`` (the ``agents.runner.ModelRunner`` protocol).
Per batch, each item's input is validated, its image decoded behind the guards of
``agents.vision_image`` and its task run in a thread pool the runner owns (OpenCV releases the GIL, so
the images of a batch are worked on in parallel). ``classify`` items are preprocessed in that pool and
then go through the Hugging Face model in one batched forward pass.

Guarantees: ``run_batch`` returns one outcome per item, in order, and a bad image (bad base64,
truncated, not an image, an unsupported format, a decompression bomb) is a ``Failure`` for that item
alone. A ``resize`` or ``smart_crop`` whose output would pass ``max_pixels`` is refused
(``payload_too_large``) before its output is allocated; a ``smart_crop`` target past it, before decoding.
An unexpected error in one item's work is logged and answered ``model_error`` for that item.

What can go wrong: ``load()`` raises if OpenCV's Haar cascade file is missing or the configured
classification model cannot be loaded (no network and not cached, say). Without a configured model,
``classify`` answers ``model_not_configured``. A claim-checked image (``image_ref``) must have been
resolved by the agent into ``input["image_bytes"]``; if not, the item answers ``claim_check_missing``.
"""

from __future__ import annotations

import base64
import logging
import queue
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import cv2
import numpy as np

from agents.claims import make_prepare, make_release
from agents.runner import Failure, Item, Outcome, parse_input, unknown_task
from agents.vision_image import (
    DecodedImage,
    b64_to_bytes,
    decode_image,
    encode_image,
    fit_size,
    fit_within,
    output_too_large,
    smart_crop,
)
from schemas import ErrorCode
from schemas.vision import (
    VISION_TASKS,
    Box,
    ClassifyImageOutput,
    DescribeOutput,
    FacesOutput,
    ImageOutput,
    LabelScore,
    VisionInput,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from streams.settings import Settings, VisionSettings

log = logging.getLogger(__name__)

CASCADE_FILE = "haarcascade_frontalface_default.xml"
DETECT_MAX_SIDE = 1024  # faces are looked for on a copy no larger than this (boxes mapped back)
CLAIM_PLACEHOLDER = "resolved-claim-check"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Job:
    """One validated item, ready for the pool."""

    task: str
    params: VisionInput
    data: bytes


class VisionRunner:
    """OpenCV tasks plus an optional Hugging Face image classifier behind one ``run_batch``."""

    service = "vision"
    tasks: tuple[str, ...] = VISION_TASKS

    def __init__(self, settings: VisionSettings) -> None:
        self._settings = settings
        self._workers = settings.threads or 2
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="vision")
        # detectMultiScale mutates the classifier (opencv/opencv#4287): each call checks one out.
        self._cascades: queue.SimpleQueue[cv2.CascadeClassifier] = queue.SimpleQueue()
        self._classifier: _Classifier | None = None
        self._loaded = False

    def load(self) -> None:
        """Load one Haar cascade per worker and the classifier, if configured; warm both up."""
        if self._loaded:
            return
        if self._settings.threads:
            cv2.setNumThreads(self._settings.threads)
        path = Path(cv2.data.haarcascades) / CASCADE_FILE  # type: ignore[attr-defined]
        if not path.is_file():
            raise RuntimeError(f"OpenCV's face cascade is missing: {path} (is opencv-python installed whole?)")
        cascades = [cv2.CascadeClassifier(str(path)) for _ in range(self._workers)]
        if any(c.empty() for c in cascades):
            raise RuntimeError(f"OpenCV could not load the face cascade {path}")
        model = self._settings.classify_model
        classifier = _Classifier.load(model, self._settings.threads) if model else None
        _warm_up(cascades, classifier)
        for cascade in cascades:
            self._cascades.put(cascade)
        self._classifier = classifier
        self._loaded = True

    def close(self) -> None:
        """Stop the worker threads (the runner cannot be used afterwards)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def model_for(self, task: str) -> str:
        if task == "detect_faces":
            return f"opencv-haar-frontalface@{cv2.__version__}"
        if task == "classify":
            return self._classifier.name if self._classifier else "none"
        if task in self.tasks:
            return f"opencv@{cv2.__version__}"
        return "none"

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        if not self._loaded:
            raise RuntimeError("VisionRunner.load() must be called before run_batch()")
        outcomes: list[Outcome | None] = [None] * len(items)
        work: list[tuple[int, Future[Outcome]]] = []
        to_classify: list[tuple[int, int, Future[torch.Tensor | Failure]]] = []
        for i, item in enumerate(items):
            job = self._prepare(item)
            if isinstance(job, Failure):
                outcomes[i] = job
            elif job.task != "classify":
                work.append((i, self._pool.submit(_guarded, self._run_one, job)))
            elif self._classifier is None:
                outcomes[i] = Failure(
                    ErrorCode.MODEL_NOT_CONFIGURED,
                    "classify needs a model: set AISEMBLE_VISION__CLASSIFY_MODEL to a Hugging Face "
                    "image-classification model (name or local path)",
                )
            else:
                pending = self._pool.submit(_guarded, self._classify_input, job)
                to_classify.append((i, job.params.top_k, pending))
        if to_classify:  # the forward pass overlaps the pool's work on the other items
            for i, outcome in self._classify([(i, top_k, f.result()) for i, top_k, f in to_classify]):
                outcomes[i] = outcome
        for i, done in work:
            outcomes[i] = done.result()
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]

    # -- per item --------------------------------------------------------------------------------

    def _prepare(self, item: Item) -> _Job | Failure:
        """Validate the item's input and get its image bytes (inline base64 or a resolved claim check)."""
        if item.task not in self.tasks:
            return unknown_task(item.task, self.tasks)
        raw = item.input.get("image_bytes")
        if raw is not None:  # the agent resolved a claim check: the image is given, validate the rest
            if not isinstance(raw, bytes | bytearray | memoryview):
                return Failure(ErrorCode.INVALID_INPUT, "image_bytes: expected bytes")
            rest = {k: v for k, v in item.input.items() if k not in ("image_bytes", "image_ref")}
            params = parse_input(VisionInput, {**rest, "image_ref": CLAIM_PLACEHOLDER})
            data: bytes | Failure = bytes(raw)
        else:
            params = parse_input(VisionInput, item.input)
            if isinstance(params, Failure):
                return params
            if params.image_b64 is None:
                return Failure(
                    ErrorCode.CLAIM_CHECK_MISSING,
                    f"image_ref {params.image_ref!r} was not resolved to image bytes",
                )
            data = b64_to_bytes(params.image_b64)
        if isinstance(params, Failure):
            return params
        if isinstance(data, Failure):
            return data
        if item.task == "smart_crop" and (params.width is None or params.height is None):
            missing = " and ".join(n for n in ("width", "height") if getattr(params, n) is None)
            return Failure(ErrorCode.INVALID_INPUT, f"smart_crop needs 'width' and 'height'; missing {missing}")
        if item.task == "smart_crop" and params.width is not None and params.height is not None:
            too_large = output_too_large(item.task, params.width, params.height, self._settings.max_pixels)
            if too_large is not None:  # refused before the image is even decoded
                return too_large
        return _Job(task=item.task, params=params, data=data)

    def _decode(self, job: _Job) -> DecodedImage | Failure:
        return decode_image(
            job.data,
            formats=self._settings.formats,
            max_pixels=self._settings.max_pixels,
            keep_alpha=job.task in ("resize", "smart_crop"),
        )

    def _run_one(self, job: _Job) -> Outcome:
        """Decode and run one non-classify task (in a pool thread)."""
        image = self._decode(job)
        if isinstance(image, Failure):
            return image
        p = job.params
        if job.task == "detect_faces":
            boxes = self._detect(image.pixels, p.min_face_size)
            return FacesOutput(faces=boxes, count=len(boxes), width=image.width, height=image.height).model_dump()
        if job.task == "describe":
            return describe(image).model_dump()
        if job.task == "resize":
            size = fit_size(image.width, image.height, p.max_size)
        else:
            assert p.width is not None and p.height is not None  # checked in _prepare
            size = (p.width, p.height)
        too_large = output_too_large(job.task, *size, self._settings.max_pixels)
        if too_large is not None:  # never for resize today (it never upscales), kept for any future rule
            return too_large
        out = fit_within(image.pixels, p.max_size) if job.task == "resize" else smart_crop(image.pixels, *size)
        return ImageOutput(
            image_b64=base64.b64encode(encode_image(out, p.format)).decode("ascii"),
            width=int(out.shape[1]),
            height=int(out.shape[0]),
            format=p.format,
        ).model_dump()

    def _detect(self, pixels: np.ndarray, min_face_size: int) -> list[Box]:
        cascade = self._cascades.get()
        try:
            return detect_faces(cascade, pixels, min_face_size)
        finally:
            self._cascades.put(cascade)

    def _classify_input(self, job: _Job) -> torch.Tensor | Failure:
        """Decode and preprocess one classify item (in a pool thread)."""
        assert self._classifier is not None
        image = self._decode(job)
        if isinstance(image, Failure):
            return image
        return self._classifier.preprocess(cv2.cvtColor(image.pixels, cv2.COLOR_BGR2RGB))

    def _classify(self, prepared: list[tuple[int, int, torch.Tensor | Failure]]) -> list[tuple[int, Outcome]]:
        """One forward pass over the preprocessed classify items ``(index, top_k, input)``."""
        assert self._classifier is not None
        results: list[tuple[int, Outcome]] = [(i, x) for i, _, x in prepared if isinstance(x, Failure)]
        ready = [(i, k, x) for i, k, x in prepared if not isinstance(x, Failure)]
        if not ready:
            return results
        try:
            labels = self._classifier.predict([x for _, _, x in ready], [k for _, k, _ in ready])
        except Exception as exc:
            log.exception("vision classify forward pass failed")
            failure = Failure(ErrorCode.MODEL_ERROR, f"classify failed: {type(exc).__name__}: {exc}")
            return results + [(i, failure) for i, _, _ in ready]
        outputs = [ClassifyImageOutput(labels=ls).model_dump() for ls in labels]
        return results + [(i, out) for (i, _, _), out in zip(ready, outputs, strict=True)]


def _warm_up(cascades: list[cv2.CascadeClassifier], classifier: _Classifier | None) -> None:
    """Touch every cascade, the encoders and the classifier once, so the first batch is not slow."""
    grey = np.full((96, 96), 128, np.uint8)
    for cascade in cascades:
        cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(30, 30))
    for fmt in ("png", "jpeg", "webp"):
        encode_image(np.zeros((16, 16, 3), np.uint8), fmt)
    if classifier is not None:
        classifier.predict([classifier.preprocess(np.zeros((64, 64, 3), np.uint8))], [1])


def _guarded(fn: Callable[[_Job], T], job: _Job) -> T | Failure:
    """Run one item's work; an unexpected error becomes that item's ``model_error``."""
    try:
        return fn(job)
    except Exception as exc:
        log.exception("vision %s failed on one item", job.task)
        return Failure(ErrorCode.MODEL_ERROR, f"{job.task} failed: {type(exc).__name__}: {exc}")


def detect_faces(cascade: cv2.CascadeClassifier, pixels: np.ndarray, min_face_size: int) -> list[Box]:
    """Frontal faces in BGR(A) ``pixels``, as boxes in the image's own coordinates.

    Images larger than ``DETECT_MAX_SIDE`` are searched on a downscaled copy (faster, and the cascade
    works at a fixed 24 px window anyway); ``min_face_size`` is scaled with it and boxes are mapped back.
    """
    grey = cv2.cvtColor(pixels, cv2.COLOR_BGRA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    height, width = grey.shape
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    if scale < 1.0:
        grey = fit_within(grey, DETECT_MAX_SIDE)
        scale = grey.shape[1] / width
    grey = cv2.equalizeHist(grey)
    side = max(1, round(min_face_size * scale))
    found = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    boxes = []
    for x, y, w, h in found if len(found) else []:
        bx, by = min(width - 1, round(x / scale)), min(height - 1, round(y / scale))
        boxes.append(Box(x=bx, y=by, w=min(width - bx, round(w / scale)), h=min(height - by, round(h / scale))))
    return boxes


def describe(image: DecodedImage) -> DescribeOutput:
    """Size, channels, mean colour (R, G, B) and sharpness (variance of the Laplacian) of an image."""
    pixels = image.pixels[:, :, :3]
    blue, green, red, _ = cv2.mean(pixels)
    grey = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    sharpness = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    return DescribeOutput(
        width=image.width,
        height=image.height,
        channels=image.channels,
        mean_color=[round(red, 3), round(green, 3), round(blue, 3)],
        sharpness=round(sharpness, 3),
    )


class _Classifier:
    """A Hugging Face image-classification model and its image processor (torch imported lazily)."""

    def __init__(self, name: str, processor: Callable[..., Mapping[str, torch.Tensor]], model: PreTrainedModel) -> None:
        self.name = name
        self._processor = processor
        self._model = model
        self._device = next(model.parameters()).device
        config = model.config
        self._id2label: dict[int, str] = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self._multi_label = getattr(config, "problem_type", None) == "multi_label_classification"

    @classmethod
    def load(cls, name: str, threads: int | None) -> _Classifier:
        import torch

        # Imported from their modules: transformers 5.17's top-level ``AutoImageProcessor`` is a
        # placeholder demanding torchvision (huggingface/transformers#48607); the module's class picks
        # the Pillow backend when torchvision is absent.
        from transformers.models.auto.image_processing_auto import AutoImageProcessor
        from transformers.models.auto.modeling_auto import AutoModelForImageClassification

        if threads:
            torch.set_num_threads(threads)
        try:
            processor = AutoImageProcessor.from_pretrained(name)
            model = AutoModelForImageClassification.from_pretrained(name)
        except (OSError, ValueError, ImportError) as exc:
            raise RuntimeError(
                f"could not load the image-classification model {name!r} (AISEMBLE_VISION__CLASSIFY_MODEL): {exc}"
            ) from exc
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        revision = getattr(model.config, "_commit_hash", None)
        return cls(f"{name}@{revision[:12]}" if revision else name, processor, model)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """One HxWx3 RGB uint8 image to the model's ``pixel_values`` (1xCxHxW)."""
        return self._processor(images=rgb, return_tensors="pt")["pixel_values"]

    def predict(self, pixel_values: list[torch.Tensor], top_ks: list[int]) -> list[list[LabelScore]]:
        """Labels for each preprocessed image, one forward pass per distinct input shape (usually one)."""
        import torch

        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(pixel_values):
            by_shape.setdefault(tuple(x.shape[1:]), []).append(i)
        out: list[list[LabelScore]] = [[] for _ in pixel_values]
        with torch.inference_mode():
            for indices in by_shape.values():
                batch = torch.cat([pixel_values[i] for i in indices]).to(self._device)
                logits = self._model(pixel_values=batch).logits.float()
                probs = logits.sigmoid() if self._multi_label else logits.softmax(dim=-1)
                k = min(max(top_ks[i] for i in indices), probs.shape[-1])
                scores, ids = probs.topk(k, dim=-1)
                for row, i in enumerate(indices):
                    n = min(top_ks[i], k)
                    out[i] = [
                        LabelScore(label=self._id2label.get(int(c), f"LABEL_{int(c)}"), score=round(float(s), 6))
                        for s, c in zip(scores[row, :n].tolist(), ids[row, :n].tolist(), strict=True)
                    ]
        return out


def build_runner(settings: Settings) -> VisionRunner:
    """The vision runner for these settings (call ``load()`` before the first batch)."""
    return VisionRunner(settings.vision)


__all__ = ["VisionRunner", "build_runner", "describe", "detect_faces", "make_prepare", "make_release"]
