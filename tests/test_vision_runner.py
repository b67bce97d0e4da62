"""The vision runner on real and synthetic images: faces, geometry, describe and every bad-image path."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from agents import vision
from agents.runner import Failure, Item, Outcome
from agents.vision import VisionRunner, build_runner
from agents.vision_image import fit_size, output_too_large
from schemas import ErrorCode
from schemas.vision import DescribeOutput, FacesOutput, ImageOutput
from streams.settings import Settings, VisionSettings

ASTRONAUT = Path(__file__).parent / "data" / "astronaut.jpg"


@pytest.fixture(scope="module")
def runner() -> Iterator[VisionRunner]:
    runner = build_runner(Settings(vision=VisionSettings()))
    runner.load()
    yield runner
    runner.close()


def encode(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def item(task: str, data: bytes, **params: object) -> Item:
    return Item(task, {"image_b64": b64(data), **params})


def one(runner: VisionRunner, task: str, data: bytes, **params: object) -> Outcome:
    [outcome] = runner.run_batch([item(task, data, **params)])
    return outcome


def ok(outcome: Outcome) -> dict[str, object]:
    assert not isinstance(outcome, Failure), outcome
    return outcome


def decode_output(outcome: Outcome) -> np.ndarray:
    """The RGB(A) pixels of an ImageOutput's image, checked against its declared size."""
    out = ImageOutput.model_validate(ok(outcome))
    img = Image.open(io.BytesIO(base64.b64decode(out.image_b64)))
    assert img.size == (out.width, out.height)
    assert img.format == out.format.upper()
    return np.asarray(img)


def solid(width: int, height: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.full((height, width, 3), rgb, np.uint8)


def gradient(width: int = 640, height: int = 480) -> np.ndarray:
    row = np.linspace(0, 255, width, dtype=np.uint8)
    grey = np.tile(row, (height, 1))
    return np.dstack([grey, grey[::-1, ::-1], np.full_like(grey, 90)])


def png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels that compresses to a few tens of kilobytes."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits, all zero
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- detect_faces ------------------------------------------------------------------------------


def test_astronaut_has_one_face_over_her_face(runner: VisionRunner) -> None:
    out = FacesOutput.model_validate(ok(one(runner, "detect_faces", ASTRONAUT.read_bytes())))
    assert (out.width, out.height) == (512, 512)
    assert out.count == len(out.faces) == 1
    face = out.faces[0]
    # Eileen Collins's face is in the upper middle of the 512x512 photo, about 100 px across.
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    assert 170 <= cx <= 280 and 70 <= cy <= 170, face
    assert 60 <= face.w <= 150 and 60 <= face.h <= 150, face


def test_large_image_is_searched_downscaled_and_boxes_map_back(runner: VisionRunner) -> None:
    small = FacesOutput.model_validate(ok(one(runner, "detect_faces", ASTRONAUT.read_bytes())))
    bgr = cv2.imread(str(ASTRONAUT))
    big = cv2.resize(bgr, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    data = cv2.imencode(".jpg", big)[1].tobytes()
    # min_face_size is in the image's own pixels (200 here is 100 on the 1024 px copy searched).
    out = FacesOutput.model_validate(ok(one(runner, "detect_faces", data, min_face_size=200)))
    assert (out.width, out.height, out.count) == (2048, 2048, 1)
    face, ref = out.faces[0], small.faces[0]
    for got, want in ((face.x, ref.x), (face.y, ref.y), (face.w, ref.w), (face.h, ref.h)):
        assert abs(got - 4 * want) <= 40, (face, ref)


def test_gradient_has_no_face(runner: VisionRunner) -> None:
    out = FacesOutput.model_validate(ok(one(runner, "detect_faces", encode(gradient()))))
    assert out.count == 0 and out.faces == []


def test_min_face_size_larger_than_the_face_finds_none(runner: VisionRunner) -> None:
    out = FacesOutput.model_validate(ok(one(runner, "detect_faces", ASTRONAUT.read_bytes(), min_face_size=300)))
    assert out.count == 0


# -- resize and smart_crop ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_size", "expected"),
    [((640, 480), 320, (320, 240)), ((300, 600), 200, (100, 200)), ((100, 50), 1024, (100, 50))],
)
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_resize_keeps_aspect_and_never_upscales(
    runner: VisionRunner, size: tuple[int, int], max_size: int, expected: tuple[int, int], fmt: str
) -> None:
    data = encode(gradient(*size))
    pixels = decode_output(one(runner, "resize", data, max_size=max_size, format=fmt))
    assert (pixels.shape[1], pixels.shape[0]) == expected


def test_resize_keeps_alpha_in_png(runner: VisionRunner) -> None:
    rgba = np.zeros((40, 80, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 100
    pixels = decode_output(one(runner, "resize", encode(rgba), max_size=20))
    assert pixels.shape == (10, 20, 4)
    assert abs(int(pixels[..., 3].mean()) - 100) <= 1


def test_smart_crop_of_a_tall_image_keeps_the_top(runner: VisionRunner) -> None:
    tall = np.vstack([solid(200, 200, (255, 0, 0)), solid(200, 200, (0, 0, 255))])  # red over blue
    pixels = decode_output(one(runner, "smart_crop", encode(tall), width=100, height=50))
    assert pixels.shape == (50, 100, 3)
    assert pixels.reshape(-1, 3).mean(axis=0).round().tolist() == [255, 0, 0]


def test_smart_crop_of_a_wide_image_keeps_the_centre(runner: VisionRunner) -> None:
    thirds = [solid(100, 100, c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    wide = np.hstack(thirds)
    pixels = decode_output(one(runner, "smart_crop", encode(wide), width=64, height=64))
    assert pixels.shape == (64, 64, 3)
    assert pixels.reshape(-1, 3).mean(axis=0).round().tolist() == [0, 255, 0]


@pytest.mark.parametrize(("width", "height"), [(17, 333), (333, 17), (1, 1), (640, 480)])
def test_smart_crop_gives_exactly_the_target_size(runner: VisionRunner, width: int, height: int) -> None:
    pixels = decode_output(one(runner, "smart_crop", ASTRONAUT.read_bytes(), width=width, height=height))
    assert pixels.shape[:2] == (height, width)


@pytest.mark.parametrize("params", [{}, {"width": 10}, {"height": 10}])
def test_smart_crop_needs_width_and_height(runner: VisionRunner, params: dict[str, int]) -> None:
    outcome = one(runner, "smart_crop", encode(gradient()), **params)
    assert isinstance(outcome, Failure) and outcome.code == ErrorCode.INVALID_INPUT
    assert "width" in outcome.message and "height" in outcome.message


# -- describe ----------------------------------------------------------------------------------


def test_describe_a_solid_colour_in_rgb_order(runner: VisionRunner) -> None:
    out = DescribeOutput.model_validate(ok(one(runner, "describe", encode(solid(64, 32, (10, 200, 30))))))
    assert (out.width, out.height, out.channels) == (64, 32, 3)
    assert out.mean_color == [10.0, 200.0, 30.0]
    assert out.sharpness == 0.0


def test_describe_sharpness_orders_sharp_above_blurred(runner: VisionRunner) -> None:
    sharp = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    blurred = cv2.GaussianBlur(sharp, (0, 0), 4)
    a, b = runner.run_batch([item("describe", encode(sharp)), item("describe", encode(blurred))])
    assert DescribeOutput.model_validate(ok(a)).sharpness > 5 * DescribeOutput.model_validate(ok(b)).sharpness


def test_describe_reports_the_source_channels(runner: VisionRunner) -> None:
    grey = encode(np.full((8, 8), 77, np.uint8))
    out = DescribeOutput.model_validate(ok(one(runner, "describe", grey)))
    assert out.channels == 1 and out.mean_color == [77.0, 77.0, 77.0]


# -- bad images, each beside good items in the same batch ----------------------------------------


def test_each_bad_image_fails_alone_in_a_mixed_batch(runner: VisionRunner) -> None:
    good = encode(solid(16, 16, (1, 2, 3)))
    jpeg = ASTRONAUT.read_bytes()
    ppm = encode(solid(8, 8, (5, 5, 5)), "PPM")
    cases: list[tuple[Item, str | None, str]] = [
        (item("describe", good), None, ""),
        (item("describe", jpeg[: len(jpeg) // 2]), ErrorCode.INVALID_INPUT, "could not be decoded"),
        (item("resize", good, max_size=8), None, ""),
        (item("describe", random.Random(0).randbytes(4096)), ErrorCode.INVALID_INPUT, "could not be decoded"),
        (Item("describe", {"image_b64": "not base64 at all!"}), ErrorCode.INVALID_INPUT, "image_b64"),
        (item("detect_faces", ppm), ErrorCode.INVALID_INPUT, "unsupported image format PPM"),
        (item("describe", b""), ErrorCode.INVALID_INPUT, "could not be decoded"),
        (item("describe", png_bomb(7000)), ErrorCode.PAYLOAD_TOO_LARGE, "49,000,000 pixels"),
        (item("describe", png_bomb(10_000)), ErrorCode.PAYLOAD_TOO_LARGE, "pixels"),
        (item("describe", png_bomb(20_000)), ErrorCode.PAYLOAD_TOO_LARGE, "pixels"),
        (item("detect_faces", jpeg), None, ""),
        (Item("describe", {"image_b64": b64(good), "colour": "red"}), ErrorCode.INVALID_INPUT, "colour"),
        (Item("describe", {"image_ref": "vision:abc"}), ErrorCode.CLAIM_CHECK_MISSING, "vision:abc"),
        (item("sharpen", good), ErrorCode.UNKNOWN_TASK, "sharpen"),
        (item("classify", good), ErrorCode.MODEL_NOT_CONFIGURED, "AISEMBLE_VISION__CLASSIFY_MODEL"),
        (item("smart_crop", good, width=4, height=4), None, ""),
        (item("smart_crop", good, width=8192, height=8192), ErrorCode.PAYLOAD_TOO_LARGE, "67,108,864 pixels"),
    ]
    outcomes = runner.run_batch([c[0] for c in cases])
    assert len(outcomes) == len(cases)
    for (sent, code, fragment), outcome in zip(cases, outcomes, strict=True):
        if code is None:
            ok(outcome)
        else:
            assert isinstance(outcome, Failure), (sent.task, outcome)
            assert outcome.code == code, (sent.task, outcome)
            assert fragment in outcome.message, (sent.task, outcome)


def test_pixel_limit_is_checked_before_decoding(runner: VisionRunner) -> None:
    small = build_runner(Settings(vision=VisionSettings(max_pixels=10_000, threads=1)))
    small.load()
    try:
        big, fits = small.run_batch(
            [item("describe", encode(gradient(101, 100))), item("describe", encode(gradient(100, 100)))]
        )
    finally:
        small.close()
    assert isinstance(big, Failure) and big.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert "10,100 pixels" in big.message and "10,000" in big.message
    ok(fits)


def test_smart_crop_output_past_the_pixel_limit_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    small = build_runner(Settings(vision=VisionSettings(max_pixels=10_000, threads=1)))
    small.load()
    decoded: list[int] = []
    real_decode = vision.decode_image

    def counting_decode(data: bytes, **kwargs: Any) -> Any:
        decoded.append(len(data))
        return real_decode(data, **kwargs)

    monkeypatch.setattr(vision, "decode_image", counting_decode)
    try:
        tiny = encode(solid(10, 10, (200, 100, 50)))
        over, at_limit, resized = small.run_batch(
            [
                item("smart_crop", tiny, width=101, height=100),
                item("smart_crop", tiny, width=100, height=100),  # upscaling within the limit is allowed
                item("resize", encode(gradient(100, 100)), max_size=8192),  # never upscales
            ]
        )
    finally:
        small.close()
    assert isinstance(over, Failure) and over.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert over.message == "smart_crop output would be 101x100 = 10,100 pixels; the limit is 10,000 pixels"
    assert len(decoded) == 2  # the refused item's image was never decoded
    assert decode_output(at_limit).shape == (100, 100, 3)
    assert decode_output(resized).shape[:2] == (100, 100)


def test_output_size_rules() -> None:
    assert fit_size(640, 480, 320) == (320, 240)
    assert fit_size(300, 600, 200) == (100, 200)
    assert fit_size(100, 50, 8192) == (100, 50)
    assert fit_size(10_000, 1, 100) == (100, 1)
    assert output_too_large("resize", 100, 100, 10_000) is None
    refused = output_too_large("resize", 8192, 8192, 40_000_000)
    assert isinstance(refused, Failure) and refused.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_format_allow_list_comes_from_settings() -> None:
    png_only = build_runner(Settings(vision=VisionSettings(formats=("PNG",), threads=1)))
    png_only.load()
    try:
        jpeg, png = png_only.run_batch([item("describe", ASTRONAUT.read_bytes()), item("describe", encode(gradient()))])
    finally:
        png_only.close()
    assert isinstance(jpeg, Failure) and jpeg.message.startswith("unsupported image format JPEG")
    ok(png)


# -- input forms ----------------------------------------------------------------------------------


def test_resolved_claim_check_bytes_are_used(runner: VisionRunner) -> None:
    data = encode(solid(20, 10, (9, 8, 7)))
    outcome = runner.run_batch([Item("describe", {"image_bytes": data, "image_ref": "vision:k1"})])[0]
    out = DescribeOutput.model_validate(ok(outcome))
    assert (out.width, out.height, out.mean_color) == (20, 10, [9.0, 8.0, 7.0])


def test_claim_check_bytes_with_inline_image_too_is_invalid(runner: VisionRunner) -> None:
    data = encode(solid(4, 4, (0, 0, 0)))
    [outcome] = runner.run_batch([Item("describe", {"image_bytes": data, "image_b64": b64(data)})])
    assert isinstance(outcome, Failure) and outcome.code == ErrorCode.INVALID_INPUT


def test_wrapped_base64_and_data_url_are_accepted(runner: VisionRunner) -> None:
    text = b64(encode(solid(4, 4, (1, 1, 1))))
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    outcomes = runner.run_batch(
        [
            Item("describe", {"image_b64": wrapped}),
            Item("describe", {"image_b64": "data:image/png;base64," + text}),
        ]
    )
    for outcome in outcomes:
        assert DescribeOutput.model_validate(ok(outcome)).width == 4


def test_classify_without_a_model_is_not_configured(runner: VisionRunner) -> None:
    outcome = one(runner, "classify", ASTRONAUT.read_bytes())
    assert isinstance(outcome, Failure) and outcome.code == ErrorCode.MODEL_NOT_CONFIGURED
    assert runner.model_for("classify") == "none"


def test_model_names_carry_the_opencv_version(runner: VisionRunner) -> None:
    assert runner.model_for("detect_faces") == f"opencv-haar-frontalface@{cv2.__version__}"
    for task in ("resize", "smart_crop", "describe"):
        assert runner.model_for(task) == f"opencv@{cv2.__version__}"
    assert runner.service == "vision"
    assert runner.tasks == ("detect_faces", "resize", "smart_crop", "describe", "classify")


def test_batch_equals_items_one_by_one(runner: VisionRunner) -> None:
    items = [
        item("detect_faces", ASTRONAUT.read_bytes()),
        item("describe", encode(gradient())),
        item("resize", encode(gradient()), max_size=100, format="png"),
    ] * 3
    assert runner.run_batch(items) == [runner.run_batch([i])[0] for i in items]


def test_run_batch_before_load_raises() -> None:
    fresh = build_runner(Settings())
    try:
        with pytest.raises(RuntimeError, match="load"):
            fresh.run_batch([item("describe", b"")])
    finally:
        fresh.close()
