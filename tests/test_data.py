"""Corpus loading, tokenizers, deterministic per-rank batches."""

import pytest
import torch

from journey_dist.config import ConfigError
from journey_dist.data import (
    ByteTokenizer,
    CharTokenizer,
    get_batch,
    load_text,
    load_tokens,
    microbatches,
    shard,
)


def test_embedded_corpora_ship_with_the_package():
    for name in ("handbook", "dialogues"):
        text = load_text(name)
        assert len(text) > 10_000
    assert any(ord(c) > 127 for c in load_text("handbook")), "want multi-byte UTF-8 in the corpus"


@pytest.mark.parametrize("text", ["", "hello", "naïve café — α", "日本語 🚀"])
def test_tokenizers_round_trip(text):
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    if text:
        tok = CharTokenizer(text)
        assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_unknown_character():
    with pytest.raises(ValueError, match="not in the char vocabulary"):
        CharTokenizer("abc").encode("abd")


def test_user_file_and_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text " * 100, encoding="utf-8")
    data = load_tokens(str(good), level="char")
    assert data.vocab_size == len(set("some text "))
    with pytest.raises(ConfigError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8.*iconv"):
        load_text(str(bad))
    with pytest.raises(ConfigError, match="level="):
        load_tokens(str(good), level="word")


def test_batches_are_deterministic_and_shifted():
    data = load_tokens("handbook")
    x1, y1 = get_batch(data.train, 8, 32, step=3, seed=1)
    x2, y2 = get_batch(data.train, 8, 32, step=3, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    x3, _ = get_batch(data.train, 8, 32, step=4, seed=1)
    assert not torch.equal(x1, x3)


def test_rank_shards_concatenate_to_global_batch():
    data = load_tokens("handbook")
    x, _ = get_batch(data.train, 8, 16, step=0)
    assert torch.equal(torch.cat([shard(x, r, 4) for r in range(4)]), x)
    with pytest.raises(ConfigError, match="does not divide over 3 ranks"):
        shard(x, 0, 3)
    assert len(microbatches(x, x, 4)) == 4


def test_batch_larger_than_corpus():
    with pytest.raises(ConfigError, match="needs block_size\\+1"):
        get_batch(torch.arange(10), 2, 32, step=0)
