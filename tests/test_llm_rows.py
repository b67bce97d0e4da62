"""Pure units of ``agents.llm_rows``: how a row ends (EOS, max_tokens, stop strings) under vLLM's ``ignore_eos``
and ``min_tokens``, with a toy vocabulary (one character a token, EOS decoding to nothing as both runtimes'
decoders render control tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from agents.llm_rows import RowRequest, RowState, StepReport, advance, finish_output, first_stop
from schemas.llm import CompletionInput

EOS = 0
VOCAB = {EOS: "", 1: "a", 2: "b", 3: "c", 4: "d", 5: " "}
EOS_IDS = frozenset({EOS})


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[t] for t in ids)


def _params(**fields: object) -> CompletionInput:
    return CompletionInput.model_validate({"prompt": "p", "max_tokens": 8, "temperature": 0.0, **fields})


def _generate(tokens: list[int], stream: bool = False, **fields: object) -> tuple[dict[str, object], int, str]:
    """Feed ``tokens`` one by one until the row ends: (its outcome, tokens fed, streamed text)."""
    row = RowState(RowRequest("r", [7, 7], _params(**fields), None, stream))
    report = StepReport()
    for fed, token in enumerate(tokens, start=1):
        if advance(row, token, EOS_IDS, decode, report):
            outcome = report.finished[0].outcome
            assert isinstance(outcome, dict)
            return outcome, fed, "".join(d.text for d in report.deltas)
    raise AssertionError("the row did not end")


def test_an_eos_ends_a_row_by_default_and_counts_as_a_token() -> None:
    outcome, fed, _ = _generate([1, 2, EOS, 3, 4, 1, 2, 3])
    assert (fed, outcome["text"], outcome["tokens"], outcome["finish_reason"]) == (3, "ab", 3, "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_ignore_eos_runs_to_max_tokens_and_the_eos_text_never_appears(stream: bool) -> None:
    outcome, fed, streamed = _generate([1, EOS, 2, EOS, 3, 4, 1, 2, 3], stream, ignore_eos=True)
    assert (fed, outcome["tokens"], outcome["finish_reason"]) == (8, 8, "length")
    assert outcome["text"] == "abcdab"  # the two EOS are counted, not shown
    if stream:
        assert streamed == outcome["text"]


def test_ignore_eos_still_ends_at_a_stop_string() -> None:
    outcome, fed, _ = _generate([1, EOS, 2, 3, 4, 1], ignore_eos=True, stop="bc")
    assert (fed, outcome["text"], outcome["finish_reason"]) == (4, "a", "stop")


def test_min_tokens_keeps_an_early_eos_and_lets_a_later_one_end_the_row() -> None:
    outcome, fed, _ = _generate([1, EOS, 2, EOS, 3, 4, 1, 2], min_tokens=3)
    # EOS at token 2 (<= 3 generated): kept; EOS at token 4 (> 3): ends the row
    assert (fed, outcome["text"], outcome["tokens"], outcome["finish_reason"]) == (4, "ab", 4, "stop")


def test_an_eos_right_after_min_tokens_tokens_ends_the_row() -> None:
    outcome, fed, _ = _generate([1, 2, EOS, 3], min_tokens=2)
    assert (fed, outcome["tokens"], outcome["finish_reason"]) == (3, 3, "stop")
    outcome, fed, _ = _generate([1, 2, EOS, 3, 4, 1, 2, 3], min_tokens=3)
    assert (fed, outcome["tokens"], outcome["finish_reason"]) == (8, 8, "length")


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_in_the_first_min_tokens_tokens_does_not_count(stream: bool) -> None:
    # "ab" ends at token 2 < min_tokens 4: not a stop; the next "ab" ends at token 6: it is
    outcome, fed, streamed = _generate([1, 2, 3, 4, 1, 2, 3, 4], stream, min_tokens=4, stop="ab")
    assert (fed, outcome["text"], outcome["tokens"], outcome["finish_reason"]) == (6, "abcd", 6, "stop")
    if stream:
        assert streamed == outcome["text"]
    without, fed, _ = _generate([1, 2, 3, 4, 1, 2, 3, 4], stream, stop="ab")
    assert (fed, without["text"], without["finish_reason"]) == (2, "", "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ending_at_token_min_tokens_counts(stream: bool) -> None:
    outcome, fed, streamed = _generate([3, 1, 2, 4, 1, 2], stream, min_tokens=3, stop="ab")
    assert (fed, outcome["text"], outcome["finish_reason"]) == (3, "c", "stop")
    if stream:
        assert streamed == "c"


def test_a_stop_string_straddling_min_tokens_counts_and_the_stream_never_shows_it() -> None:
    # "cab" ends at token 3 = min_tokens, though it began before; the streamed text was held back
    outcome, fed, streamed = _generate([4, 3, 1, 2, 4, 4, 4, 4], True, min_tokens=4, stop="cab")
    assert (fed, outcome["text"], outcome["finish_reason"]) == (4, "d", "stop")
    assert streamed == "d"


def test_finish_output_of_the_static_path_applies_the_same_rules() -> None:
    ids = [1, EOS, 2, 3, EOS, 4]
    assert finish_output(ids, _params(), EOS_IDS, decode, 2)["tokens"] == 2
    assert finish_output(ids, _params(min_tokens=2), EOS_IDS, decode, 2)["tokens"] == 5
    kept = finish_output(ids, _params(max_tokens=6, ignore_eos=True), EOS_IDS, decode, 2)
    assert (kept["text"], kept["tokens"], kept["finish_reason"]) == ("abcd", 6, "length")


def test_first_stop_after_a_character_skips_matches_ending_at_or_before_it() -> None:
    assert first_stop("abcab", ["ab"]) == (0, 2)
    assert first_stop("abcab", ["ab"], after=2) == (3, 5)
    assert first_stop("abcab", ["ab"], after=1) == (0, 2)  # ends at 2, past 1
    assert first_stop("abcab", ["ab"], after=5) is None


def test_min_tokens_over_max_tokens_is_refused_naming_both() -> None:
    with pytest.raises(ValidationError) as caught:
        _params(max_tokens=4, min_tokens=5)
    error = caught.value.errors()[0]
    assert error["loc"] == ("min_tokens",)
    assert "min_tokens (5)" in error["msg"] and "max_tokens (4)" in error["msg"]
    assert _params(max_tokens=4, min_tokens=4).min_tokens == 4
    with pytest.raises(ValidationError):
        _params(min_tokens=-1)
