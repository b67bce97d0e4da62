"""Pure units of the batch runner's bookkeeping (api/batch_runner.py ``BatchDriver``): the first reply of a
line is its answer (duplicates after a resume collapse), counts follow it, and a line unanswered past its
timeout is produced again until its attempts run out."""

from __future__ import annotations

from types import SimpleNamespace

from api.batch_lines import LineWork
from api.batch_runner import BatchDriver
from schemas import ErrorInfo, ReplyEvent
from schemas.batch import RequestCounts
from streams.settings import BatchSettings, Settings

B = "batch_x"


def driver(**batch: object) -> BatchDriver:
    store = SimpleNamespace(settings=Settings(batch=BatchSettings(**batch)))  # type: ignore[arg-type]
    return BatchDriver(store, dict, B)  # type: ignore[arg-type]


def work(*lines: int) -> dict[int, LineWork]:
    return {n: LineWork(n, f"c{n}", "nlp", "embed", {"texts": ["x"]}, "embeddings", "m") for n in lines}


def reply(line: int, ok: bool, batch: str = B) -> ReplyEvent:
    error = None if ok else ErrorInfo(code="deadline_exceeded", message="late")
    return ReplyEvent(id=f"{batch}-{line}", service="nlp", task="embed", ok=ok, output={} if ok else None, error=error)


def test_the_first_reply_of_a_line_is_its_answer_and_duplicates_collapse() -> None:
    d = driver()
    lines = work(1, 2, 3)
    d.sent = {1: (0.0, 1), 2: (0.0, 1), 3: (0.0, 1)}
    assert d._take([reply(1, False), reply(1, True), reply(2, True), reply(2, True), reply(9, True),
                    reply(3, True, batch="batch_other")], lines)  # fmt: skip
    assert d.answered == {1: False, 2: True}
    assert d.sent == {3: (0.0, 1)}
    assert d._counts(total=4, refused=1) == RequestCounts(total=4, completed=1, failed=2)
    assert not d._take([reply(2, False)], lines)  # nothing new: line 2 keeps its first answer
    assert d.answered[2] is True


def test_a_line_past_its_timeout_is_due_again_until_its_attempts_run_out() -> None:
    d = driver(line_timeout_s=10, line_attempts=2)
    d.sent = {1: (0.0, 1), 2: (0.0, 2), 3: (95.0, 1)}
    assert d._due(100.0) == [1]
    assert d.timed_out == {2}
    assert set(d.sent) == {1, 3}
    d.answered = {1: True}
    assert d._counts(total=3, refused=0) == RequestCounts(total=3, completed=1, failed=1)
