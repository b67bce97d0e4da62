"""Images in and out for the vision service: guarded decoding, the two geometry rules, re-encoding.

Decoding is the part that meets hostile bytes, so it runs behind three guards, in this order:

1. the header is read lazily with Pillow (no pixels): bytes Pillow cannot identify are refused;
2. the format named by the header must be one of ``settings.vision.formats`` (Pillow's names);
3. ``width * height`` must be within ``settings.vision.max_pixels``, checked *before* any pixel is
   decoded, so a decompression bomb (a small PNG declaring 20000x20000) costs a header read.

Only then are the pixels decoded, by OpenCV (it honours EXIF orientation and releases the GIL), with
Pillow as the fallback that also words the error for truncated or corrupt data. ``decode_image`` and
``b64_to_bytes`` never raise on bad input: they return a ``Failure`` (``invalid_input`` or
``payload_too_large``) for that item alone.

Pillow refuses on its own any image over twice ``PIL.Image.MAX_IMAGE_PIXELS`` (about 179 megapixels);
that refusal is also answered ``payload_too_large``, so ``max_pixels`` above it has no effect.

``fit_within`` and ``smart_crop`` are the resize rules of the design brief: never upscale, keep the
aspect ratio, ``INTER_AREA``; a crop keeps the horizontal centre of a wide image and the top of a tall one.
``smart_crop`` gives exactly the requested size, so it can upscale: the runner checks every output size
with ``output_too_large`` against ``max_pixels`` before any output pixel is allocated.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Collection
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from agents.runner import Failure
from schemas import ErrorCode

# Pillow calls a camera JPEG that carries a second (preview) picture "MPO"; to a client it is a JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# Output encodings: file extension for cv2.imencode and its parameters.
_ENCODINGS: dict[str, tuple[str, list[int]]] = {
    "png": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]),
    "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
    "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]),
}


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A decoded image: ``pixels`` is HxWx3 BGR or, when alpha was kept, HxWx4 BGRA, always uint8."""

    pixels: np.ndarray
    format: str
    channels: int  # of the source as its header declares it (1 grey, 2 grey+alpha, 3 colour, 4 with alpha)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def b64_to_bytes(text: str) -> bytes | Failure:
    """Decode ``image_b64``: standard base64, whitespace and a ``data:...;base64,`` prefix tolerated."""
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    text = "".join(text.split())  # MIME-style line wrapping
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        return Failure(ErrorCode.INVALID_INPUT, f"image_b64: not valid base64 ({exc})")


def decode_image(
    data: bytes, *, formats: Collection[str], max_pixels: int, keep_alpha: bool = False
) -> DecodedImage | Failure:
    """Decode ``data`` behind the format and pixel-count guards (see the module docstring).

    Args:
        data: the encoded image.
        formats: accepted Pillow format names (``"PNG"``, ``"JPEG"``, ...).
        max_pixels: the largest accepted ``width * height``, checked before decoding.
        keep_alpha: keep an alpha channel when the source has one (BGRA pixels); otherwise BGR.
    """
    if not data:
        return Failure(ErrorCode.INVALID_INPUT, "image could not be decoded: no bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "unknown")
            width, height = img.size
            channels, has_alpha = _channels(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own bomb check fires inside open(), before ours can.
        return Failure(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"image refused before decoding: {exc} (limit here: {max_pixels:,} pixels)",
        )
    except Image.UnidentifiedImageError:
        return Failure(ErrorCode.INVALID_INPUT, "image could not be decoded: not a known image format")
    except Exception as exc:  # noqa: BLE001 - Pillow's parsers raise many types on hostile bytes
        return Failure(ErrorCode.INVALID_INPUT, f"image could not be decoded: {exc or type(exc).__name__}")

    if fmt not in formats:
        return Failure(
            ErrorCode.INVALID_INPUT, f"unsupported image format {fmt}; accepted: {', '.join(sorted(formats))}"
        )
    if width * height > max_pixels:
        return Failure(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} pixels",
        )

    want_alpha = keep_alpha and has_alpha
    pixels = _decode_cv2(data, want_alpha)
    if pixels is None:
        decoded = _decode_pillow(data, want_alpha)
        if isinstance(decoded, Failure):
            return decoded
        pixels = decoded
    return DecodedImage(pixels=pixels, format=fmt, channels=channels)


def _channels(img: Image.Image) -> tuple[int, bool]:
    """Channel count of the source and whether it carries alpha (a palette counts as colour)."""
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    if img.mode in ("P", "PA"):
        return (4 if has_alpha else 3), has_alpha
    return len(img.getbands()), has_alpha


def _decode_cv2(data: bytes, want_alpha: bool) -> np.ndarray | None:
    flag = cv2.IMREAD_UNCHANGED if want_alpha else cv2.IMREAD_COLOR
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error:
        return None
    if pixels is None:
        return None
    if pixels.dtype == np.uint16:
        pixels = np.right_shift(pixels, 8).astype(np.uint8)
    elif pixels.dtype != np.uint8:  # float TIFF with alpha and the like: take the plain colour decode
        return _decode_cv2(data, False) if want_alpha else None
    if pixels.ndim == 2:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    return pixels


def _decode_pillow(data: bytes, want_alpha: bool) -> np.ndarray | Failure:
    try:
        with Image.open(io.BytesIO(data)) as img:
            oriented = ImageOps.exif_transpose(img)
            rgb = np.asarray(oriented.convert("RGBA" if want_alpha else "RGB"))
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, any of Pillow's error types
        return Failure(ErrorCode.INVALID_INPUT, f"image could not be decoded: {exc or type(exc).__name__}")
    return cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA if want_alpha else cv2.COLOR_RGB2BGR)


def fit_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """``(width, height)`` of ``fit_within``'s output for a ``width`` x ``height`` source."""
    if max(height, width) <= max_size:
        return width, height
    if height > width:
        return max(1, int(width * max_size / height)), max_size
    return max_size, max(1, int(height * max_size / width))


def output_too_large(task: str, width: int, height: int, max_pixels: int) -> Failure | None:
    """``payload_too_large`` when an output of ``width`` x ``height`` would pass ``max_pixels``.

    Called with the output size computed from the request (and the source size), before any output
    pixel is allocated.
    """
    if width * height <= max_pixels:
        return None
    return Failure(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"{task} output would be {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} pixels",
    )


def fit_within(image: np.ndarray, max_size: int) -> np.ndarray:
    """Shrink ``image`` so its longest side is ``max_size``, keeping the aspect ratio; never upscale."""
    height, width = image.shape[:2]
    size = fit_size(width, height, max_size)
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def smart_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop ``image`` to the aspect ratio of ``width`` x ``height``, then resize to exactly that size.

    An image wider than the target keeps its horizontal centre; any other keeps its top part, where
    faces and titles usually are.
    """
    src_height, src_width = image.shape[:2]
    target_ratio = width / height
    if src_width / src_height > target_ratio:
        new_width = max(1, int(src_height * target_ratio))
        start = (src_width - new_width) // 2
        cropped = image[:, start : start + new_width]
    else:
        new_height = max(1, int(src_width / target_ratio))
        cropped = image[:new_height, :]
    return cv2.resize(cropped, (width, height), interpolation=cv2.INTER_AREA)


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """Encode BGR(A) pixels as ``png``, ``jpeg`` (alpha dropped) or ``webp``."""
    ext, params = _ENCODINGS[fmt]
    if fmt == "jpeg" and image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as {fmt}")
    return buf.tobytes()
