"""Vocabulary growth: Heaps' law fitted exactly on a synthetic curve, types counted right,
BPE bytes per token rising with the vocabulary."""

import pytest

from journey_dist.data import load_text
from journey_dist.tokenizer import BPETokenizer
from journey_dist.vocab_growth import bpe_compression, fit_heaps, types_vs_tokens, word_tokens


def test_fit_recovers_an_exact_power_law():
    n = [10 ** (k / 4) for k in range(8, 25)]  # 100 .. 1e6
    fit = fit_heaps(n, [7.0 * x ** 0.55 for x in n])
    assert fit.K == pytest.approx(7.0, rel=1e-9) and fit.beta == pytest.approx(0.55, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0) and fit.predict(1e4) == pytest.approx(7.0 * 1e4 ** 0.55)


def test_types_vs_tokens_counts_distinct_words():
    words = word_tokens("The cat and the Hat; the cat's hat, don't 42 cats!")
    assert words == ["the", "cat", "and", "the", "hat", "the", "cat's", "hat", "don't", "cats"]
    n, v = types_vs_tokens(words, points=40)
    assert n == sorted(set(n)) and n[0] == 1 and n[-1] == len(words)
    assert v == [len(set(words[:k])) for k in n]


def test_handbook_follows_heaps_law_with_beta_below_one():
    n, v = types_vs_tokens(word_tokens(load_text("handbook")))
    fit = fit_heaps(n, v)
    assert 0.4 < fit.beta < 0.9 and fit.r2 > 0.98  # sublinear growth, a good fit in log space


def test_bpe_bytes_per_token_grows_with_vocabulary():
    text = load_text("handbook")[:20_000]
    rows = bpe_compression(BPETokenizer.train(text, 300), {"train": text}, [256, 300, 556])
    assert rows[0]["train"] == 1.0 and rows[0]["train"] < rows[1]["train"] < rows[2]["train"]
    with pytest.raises(ValueError, match="outside"):
        bpe_compression(BPETokenizer.train(text, 10), {"train": text}, [300])
