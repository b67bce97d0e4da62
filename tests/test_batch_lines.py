"""Pure units of the Batch API's core (api/batch_lines.py): input lines -> work or error lines, replies ->
output lines in OpenAI's shape, the status machine and the OpenAI objects."""

from __future__ import annotations

import orjson
import pytest

from api.batch_lines import (
    LineError,
    LineWork,
    advance,
    batch_object,
    line_of,
    parse_line,
    parse_lines,
    render_reply,
    request_id,
)
from api.openai import embedding_response
from schemas import ErrorInfo, ReplyEvent
from schemas.batch import BatchCancel, BatchState

MODELS = {"nlp": {"embed": "all-MiniLM-L6-v2"}, "llm": {"chat": "smol", "completion": "smol"}}
EMBED = "/v1/embeddings"
B = "batch_abc"


def line(custom_id: str, body: dict[str, object], url: str = EMBED) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_a_valid_embedding_line_is_work_with_the_sync_routes_input_and_model() -> None:
    raw = line("a", {"model": "nlp", "input": ["x", "y"], "encoding_format": "base64"})
    work = parse_line(B, 3, raw, EMBED, MODELS)
    assert isinstance(work, LineWork)
    assert (work.line, work.custom_id, work.service, work.task) == (3, "a", "nlp", "embed")
    assert work.payload == {"texts": ["x", "y"], "normalize": True}
    assert (work.model, work.encoding) == ("all-MiniLM-L6-v2", "base64")


def test_a_body_the_route_refuses_is_an_error_line_with_its_400_and_openai_body() -> None:
    bad = parse_line(B, 1, line("a", {"model": "nlp", "input": "x", "dimensions": 8}), EMBED, MODELS)
    assert isinstance(bad, LineError)
    response = bad.output["response"]
    assert isinstance(response, dict)
    assert response["status_code"] == 400 and response["request_id"] == f"{B}-1"
    assert response["body"]["error"]["param"] == "dimensions"
    assert response["body"]["error"]["code"] == "unsupported_parameter"
    assert bad.output["custom_id"] == "a" and bad.output["error"] is None


def test_an_unknown_model_is_404_model_not_found() -> None:
    bad = parse_line(B, 1, line("a", {"model": "gpt-9", "input": "x"}), EMBED, MODELS)
    assert isinstance(bad, LineError)
    assert bad.output["response"]["status_code"] == 404  # type: ignore[index]
    assert bad.output["response"]["body"]["error"]["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (orjson.dumps({"method": "POST", "url": EMBED, "body": {}}), "invalid_request"),
        (orjson.dumps({"custom_id": "a", "method": "GET", "url": EMBED, "body": {}}), "invalid_request"),
        (line("a", {"model": "llm", "prompt": "x"}, url="/v1/completions"), "invalid_url"),
    ],
)
def test_a_line_that_is_no_request_is_an_error_line_without_a_response(raw: bytes, code: str) -> None:
    bad = parse_line(B, 7, raw, EMBED, MODELS)
    assert isinstance(bad, LineError)
    assert bad.output["response"] is None
    assert bad.output["error"]["code"] == code  # type: ignore[index]
    assert "line 7" in bad.output["error"]["message"]  # type: ignore[index]


def test_a_streamed_line_is_refused_400_naming_stream() -> None:
    raw = line("a", {"model": "llm", "prompt": "x", "stream": True}, url="/v1/completions")
    bad = parse_line(B, 1, raw, "/v1/completions", MODELS)
    assert isinstance(bad, LineError)
    assert bad.output["response"]["status_code"] == 400  # type: ignore[index]
    assert bad.output["response"]["body"]["error"]["param"] == "stream"  # type: ignore[index]


def test_lines_are_numbered_blank_ones_skipped_and_a_repeated_custom_id_is_an_error_line() -> None:
    content = b"\n".join([line("a", {"model": "nlp", "input": "x"}), b"", line("a", {"model": "nlp", "input": "y"}),
                          line("b", {"model": "nlp", "input": "z"}), b""])  # fmt: skip
    parsed = parse_lines(B, content, EMBED, MODELS)
    assert [p.line for p in parsed] == [1, 3, 4]
    assert isinstance(parsed[0], LineWork) and isinstance(parsed[2], LineWork)
    assert isinstance(parsed[1], LineError)
    assert parsed[1].output["error"]["code"] == "duplicate_custom_id"  # type: ignore[index]


def test_request_ids_map_back_to_their_line_and_foreign_ids_to_none() -> None:
    assert line_of(B, request_id(B, 42)) == 42
    assert line_of(B, "batch_other-42") is None
    assert line_of(B, f"{B}-x") is None


def test_an_ok_reply_renders_the_sync_routes_body_and_an_error_reply_its_status() -> None:
    work = parse_line(B, 2, line("c", {"model": "nlp", "input": "x"}), EMBED, MODELS)
    assert isinstance(work, LineWork)
    output = {"results": [{"vector": [0.6, 0.8], "tokens": 3}]}
    reply = ReplyEvent(id=f"{B}-2", service="nlp", task="embed", ok=True, output=output)
    ok, rendered = render_reply(B, work, reply)
    assert ok
    assert rendered["response"] == {"status_code": 200, "request_id": f"{B}-2",
                                    "body": embedding_response(reply, "all-MiniLM-L6-v2", "float")}  # fmt: skip
    assert rendered["custom_id"] == "c" and rendered["error"] is None
    failed = ReplyEvent(id=f"{B}-2", service="nlp", task="embed", ok=False,
                        error=ErrorInfo(code="deadline_exceeded", message="late"))  # fmt: skip
    ok, rendered = render_reply(B, work, failed)
    assert not ok
    assert rendered["response"]["status_code"] == 504  # type: ignore[index]
    assert rendered["response"]["body"]["error"]["message"] == "late"  # type: ignore[index]


def _state(**kw: object) -> BatchState:
    return BatchState(id=B, endpoint=EMBED, input_file_id="file-1", created_at=100, expires_at=100 + 86400, **kw)  # type: ignore[arg-type]


def test_transitions_stamp_their_time_and_count_writes() -> None:
    state = advance(_state(), "in_progress", 110)
    assert (state.status, state.in_progress_at, state.seq) == ("in_progress", 110, 1)
    state = advance(state, "in_progress", 120)  # a progress write keeps the stamp
    assert (state.in_progress_at, state.seq) == (110, 2)
    state = advance(advance(state, "finalizing", 130), "completed", 140)
    assert (state.finalizing_at, state.completed_at, state.seq) == (130, 140, 4)
    state = advance(advance(_state(), "in_progress", 1), "cancelling", 2)
    assert advance(state, "cancelled", 3).cancelled_at == 3


@pytest.mark.parametrize(("start", "to"), [("validating", "completed"), ("completed", "in_progress"),
                                           ("cancelling", "completed"), ("finalizing", "cancelling")])  # fmt: skip
def test_a_status_that_cannot_follow_is_refused(start: str, to: str) -> None:
    with pytest.raises(ValueError, match="not a transition"):
        advance(_state(status=start), to, 1)  # type: ignore[arg-type]


def test_a_pending_cancel_shows_as_cancelling_until_the_runner_ends_the_batch() -> None:
    cancel = BatchCancel(batch_id=B, at=150)
    shown = batch_object(_state(status="in_progress"), cancel)
    assert (shown["status"], shown["cancelling_at"]) == ("cancelling", 150)
    assert batch_object(_state(status="completed"), cancel)["status"] == "completed"
    assert batch_object(_state(status="in_progress"))["status"] == "in_progress"
