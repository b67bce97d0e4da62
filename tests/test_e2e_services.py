"""End to end with the shipped models: the NLP, vision and LLM agents behind the edge and on Kafka.

The brief's example payloads answer through REST and through a plain Kafka client; a photo with a face
gets a box; a large image travels by claim check.
"""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from aisemble.pipeline import Pipeline
from schemas import ErrorCode, ReplyEvent
from streams.settings import Settings
from tests.kafka_client import RawClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(__file__).parent / "data"
SENTIMENT = {"text": "This is a great product! I love it.", "task": "sentiment"}
COMPLETION = {"prompt": "Hello, this is a test prompt.", "max_tokens": 20, "temperature": 0.1}


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    p = Pipeline.isolated(
        infra_settings,
        ["nlp", "vision", "llm"],
        logs,
        AISEMBLE_REQUEST_TIMEOUT_S="120",
        AISEMBLE_VISION__INLINE_MAX_BYTES="65536",
        AISEMBLE_NLP__THREADS="1",
        AISEMBLE_VISION__THREADS="1",
        AISEMBLE_LLM__THREADS="1",
    ).start(timeout_s=600)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def http(pipeline: Pipeline) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pipeline.url, timeout=180) as client:
        yield client


def test_brief_sentiment_payload_through_rest(http: httpx.Client) -> None:
    response = http.post("/ai/nlp/process", json=SENTIMENT)
    assert response.status_code == 200, response.text
    reply = ReplyEvent.model_validate(response.json())
    assert reply.output["label"] == "positive" and 0.5 < reply.output["score"] <= 1  # type: ignore[index,operator]
    assert reply.model and reply.timings_ms["inference_ms"] > 0


def test_nlp_batch_texts_and_embeddings(http: httpx.Client) -> None:
    body = {"texts": ["Terrible, it broke on day one.", "Wonderful service, thank you!"], "task": "sentiment"}
    results = http.post("/ai/nlp/process", json=body).json()["output"]["results"]
    assert [r["label"] for r in results] == ["negative", "positive"]
    embed = http.post("/ai/nlp/process", json={"text": "hello world", "task": "embed"}).json()["output"]
    assert embed["dim"] == 384 and abs(np.linalg.norm(embed["vector"]) - 1) < 1e-3


def test_nlp_bad_input_is_422_naming_the_field(http: httpx.Client) -> None:
    response = http.post("/ai/nlp/process", json={"text": "a", "task": "classify"})
    assert response.status_code == 422
    assert (
        response.json()["error"]["code"] == ErrorCode.INVALID_INPUT and "labels" in response.json()["error"]["message"]
    )


def test_face_photo_gets_a_box_json_and_multipart(http: httpx.Client) -> None:
    photo = (DATA / "astronaut.jpg").read_bytes()
    body = {"task": "detect_faces", "image_b64": base64.b64encode(photo).decode(), "cache": False}
    as_json = http.post("/ai/vision/analyze", json=body).json()
    upload = http.post(
        "/ai/vision/analyze/upload", data={"task": "detect_faces"}, files={"file": ("a.jpg", photo, "image/jpeg")}
    ).json()
    for reply in (as_json, upload):
        assert reply["ok"], reply
        (face,) = reply["output"]["faces"]
        assert 100 < face["x"] + face["w"] / 2 < 400 and 0 < face["y"] < 256  # the face is upper middle


def test_large_image_travels_by_claim_check(http: httpx.Client) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (400, 600, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")  # ~700 KB > the 64 KiB inline limit set above
    assert buffer.tell() > 65536
    response = http.post(
        "/ai/vision/analyze/upload",
        data={"task": "resize", "max_size": "150"},
        files={"file": ("n.png", buffer.getvalue(), "image/png")},
    )
    assert response.status_code == 200, response.text
    out = response.json()["output"]
    assert (out["width"], out["height"]) == (150, 100)


def test_bad_image_is_an_error_reply_not_a_crash(http: httpx.Client) -> None:
    body = {"task": "describe", "image_b64": base64.b64encode(b"not an image at all").decode()}
    response = http.post("/ai/vision/analyze", json=body)
    assert response.status_code == 422 and response.json()["error"]["code"] == ErrorCode.INVALID_INPUT
    assert http.post("/ai/vision/analyze", json={**body, "image_b64": "!!!"}).status_code == 422


def test_brief_completion_payload_through_rest(http: httpx.Client) -> None:
    response = http.post("/ai/llm/completion", json=COMPLETION)
    assert response.status_code == 200, response.text
    out = response.json()["output"]
    assert out["text"].strip() and 0 < out["tokens"] <= 20 and out["finish_reason"] in ("stop", "length")


def test_greedy_completion_is_cached_sampled_is_not(http: httpx.Client) -> None:
    greedy = {"prompt": f"Say hello to {uuid.uuid4().hex[:6]}.", "max_tokens": 8, "temperature": 0}
    first, second = (http.post("/ai/llm/completion", json=greedy).json() for _ in range(2))
    assert (first["cached"], second["cached"]) == (False, True) and first["output"] == second["output"]
    sampled = {**greedy, "temperature": 0.9}
    assert [http.post("/ai/llm/completion", json=sampled).json()["cached"] for _ in range(2)] == [False, False]


async def test_brief_payloads_through_kafka(pipeline: Pipeline) -> None:
    async with RawClient(pipeline.settings) as client:
        requests = {
            "nlp": {"task": "sentiment", "input": {"text": SENTIMENT["text"]}},
            "llm": {"task": "completion", "input": COMPLETION},
        }
        for service, body in requests.items():
            await client.send_request(
                service, {"id": f"{service}-{uuid.uuid4().hex}", **body, "reply_to": client.reply_topic}
            )
        replies = {r["service"]: ReplyEvent.model_validate(r) for r in await client.read(client.reply_topic, 2, 180)}
    assert replies["nlp"].ok and replies["nlp"].output["label"] == "positive"  # type: ignore[index]
    assert replies["llm"].ok and replies["llm"].output["text"]  # type: ignore[index]
