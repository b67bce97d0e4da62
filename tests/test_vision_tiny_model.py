"""``classify`` through the real ``from_pretrained`` path, on a tiny random ViT saved in the test.

No weights are downloaded: the model is built from a config and saved to a temporary directory.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image

from agents.runner import Failure, Item
from agents.vision import VisionRunner, build_runner
from schemas import ErrorCode
from schemas.vision import ClassifyImageOutput, DescribeOutput
from streams.settings import Settings, VisionSettings

LABELS = {0: "cat", 1: "dog", 2: "bird"}
ASTRONAUT = Path(__file__).parent / "data" / "astronaut.jpg"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-vit")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(LABELS),
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    transformers.ViTForImageClassification(config).save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> Iterator[VisionRunner]:
    runner = build_runner(Settings(vision=VisionSettings(classify_model=str(model_dir), threads=2)))
    runner.load()
    yield runner
    runner.close()


def png(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def classify(image_b64: str, top_k: int) -> Item:
    return Item("classify", {"image_b64": image_b64, "top_k": top_k})


def check_labels(outcome: object, top_k: int) -> ClassifyImageOutput:
    assert not isinstance(outcome, Failure), outcome
    out = ClassifyImageOutput.model_validate(outcome)
    assert len(out.labels) == min(top_k, len(LABELS))
    assert {ls.label for ls in out.labels} <= set(LABELS.values())
    assert len({ls.label for ls in out.labels}) == len(out.labels)
    scores = [ls.score for ls in out.labels]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) <= 1.0 + 1e-5
    return out


def test_classify_answers_top_k_labels_from_id2label(runner: VisionRunner) -> None:
    astronaut = base64.b64encode(ASTRONAUT.read_bytes()).decode("ascii")
    rng = np.random.default_rng(0)
    noise = png(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    top1, top2, all3 = runner.run_batch([classify(astronaut, 1), classify(noise, 2), classify(astronaut, 50)])
    check_labels(top1, 1)
    check_labels(top2, 2)
    everything = check_labels(all3, 50)
    assert abs(sum(ls.score for ls in everything.labels) - 1.0) < 1e-4
    assert everything.labels[0] == check_labels(top1, 1).labels[0]


def test_one_forward_pass_per_batch_beside_other_tasks(runner: VisionRunner) -> None:
    calls: list[int] = []
    model = runner._classifier._model  # type: ignore[union-attr]
    hook = model.register_forward_hook(
        lambda _m, _args, kwargs, _out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        rng = np.random.default_rng(1)
        images = [png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 20), (64, 48), (33, 90))]
        outcomes = runner.run_batch(
            [
                classify(images[0], 3),
                Item("describe", {"image_b64": images[1]}),
                classify(base64.b64encode(b"not an image").decode(), 3),
                classify(images[1], 2),
                classify(images[2], 1),
            ]
        )
    finally:
        hook.remove()
    assert calls == [3]  # one forward pass, for the three decodable classify items
    check_labels(outcomes[0], 3)
    assert DescribeOutput.model_validate(outcomes[1]).width == 48
    assert isinstance(outcomes[2], Failure) and outcomes[2].code == ErrorCode.INVALID_INPUT
    check_labels(outcomes[3], 2)
    check_labels(outcomes[4], 1)


def test_model_name_is_the_configured_model(runner: VisionRunner, model_dir: Path) -> None:
    assert runner.model_for("classify").startswith(str(model_dir))


def test_a_missing_model_fails_load_clearly(tmp_path: Path) -> None:
    broken = build_runner(Settings(vision=VisionSettings(classify_model=str(tmp_path / "nothing-here"))))
    try:
        with pytest.raises(RuntimeError, match="AISEMBLE_VISION__CLASSIFY_MODEL"):
            broken.load()
    finally:
        broken.close()
