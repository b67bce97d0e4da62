"""Benchmark inputs for the vision runner: a realistic mix of tasks, images encoded once and reused.

The mix cycles through face detection on the astronaut photo (512x512 JPEG, ``tests/data``), a
describe and a resize to 320 px of a 640x480 JPEG (a noisy synthetic scene, about 110 KB), so a batch
of ``n`` exercises decoding, the cascade, the statistics and re-encoding in a 1:1:1 ratio.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from agents.runner import Item

ASTRONAUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "astronaut.jpg"


@lru_cache(maxsize=1)
def _payloads() -> tuple[str, str]:
    """(astronaut JPEG, 640x480 JPEG) as base64, built once per process."""
    face = cv2.imread(str(ASTRONAUT))
    if face is None:
        raise FileNotFoundError(f"benchmark photo missing: {ASTRONAUT}")
    if max(face.shape[:2]) > 512:
        scale = 512 / max(face.shape[:2])
        face = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(42)
    ramp = np.tile(np.linspace(0, 255, 640, dtype=np.float32), (480, 1))
    noise = rng.normal(0, 12, (480, 640, 3)).astype(np.float32)
    scene = np.clip(np.dstack([ramp, ramp[::-1], np.full_like(ramp, 120)]) + noise, 0, 255).astype(np.uint8)

    def jpeg_b64(pixels: np.ndarray) -> str:
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        return base64.b64encode(buf.tobytes()).decode("ascii")

    return jpeg_b64(face), jpeg_b64(scene)


def sample_items(n: int) -> list[Item]:
    """``n`` vision items: detect_faces, describe and resize in turn."""
    face, scene = _payloads()
    mix = [
        Item("detect_faces", {"image_b64": face}),
        Item("describe", {"image_b64": scene}),
        Item("resize", {"image_b64": scene, "max_size": 320, "format": "jpeg"}),
    ]
    return [mix[i % len(mix)] for i in range(n)]
