"""Cost-based chunks of the NLP encoders: sorted by tokens, capped by rows and by padded tokens."""

from __future__ import annotations

from transformers import AutoTokenizer

from agents import nlp_models
from agents.nlp_models import CHUNK, TOKEN_BUDGET, _tokenized_chunks, shipped_minilm_path


def test_chunks_are_sorted_by_tokens_and_capped_by_rows_and_padded_tokens() -> None:
    tokenizer = AutoTokenizer.from_pretrained(shipped_minilm_path(), local_files_only=True)
    long_text = "the parcel arrived two weeks late and the box was crushed " * 30
    texts = ["ok", long_text, "fine thanks", "x"] * 50  # 50 long texts among 150 short ones
    chunks = list(_tokenized_chunks(tokenizer, texts, 512))
    seen = sorted(i for idx, _ in chunks for i in idx)
    assert seen == list(range(len(texts)))  # every text exactly once
    lengths = [int(enc["attention_mask"].sum(dim=1).max()) for _, enc in chunks]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    for idx, enc in chunks:
        rows, width = enc["input_ids"].shape
        assert rows == len(idx) <= CHUNK
        assert rows == 1 or rows * width <= TOKEN_BUDGET
        # each row is the text's own tokens, padded: the same ids as tokenizing it alone
        alone = tokenizer(texts[idx[0]], truncation=True, max_length=512)["input_ids"]
        assert enc["input_ids"][0, : len(alone)].tolist() == alone
    long_chunks = [len(idx) for idx, enc in chunks if enc["input_ids"].shape[1] > 100]
    assert long_chunks and max(long_chunks) < 50  # the long texts are split by the token budget, not by rows


def test_a_text_longer_than_the_budget_goes_alone(monkeypatch: object) -> None:
    tokenizer = AutoTokenizer.from_pretrained(shipped_minilm_path(), local_files_only=True)
    monkeypatch.setattr(nlp_models, "TOKEN_BUDGET", 16)  # type: ignore[attr-defined]
    texts = ["word " * 40, "a", "b"]
    chunks = [idx for idx, _ in nlp_models._tokenized_chunks(tokenizer, texts, 512)]
    assert chunks[0] == [0]
