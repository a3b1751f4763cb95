"""Vocabulary growth: Heaps' law fitted exactly on a synthetic curve, types counted right,
BPE bytes per token rising with the vocabulary."""

import pytest

from journey_dist.data import load_text
from journey_dist.plots import compression_plot, vocab_growth_plot
from journey_dist.report import pieces_table
from journey_dist.tokenizer import BPETokenizer, WordPieceTokenizer
from journey_dist.vocab_growth import (
    bpe_compression,
    compression_by_merges,
    fit_heaps,
    heaps_curve,
    types_vs_tokens,
    word_tokens,
    wordpiece_vs_bpe,
)


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


def test_compression_by_merges_is_bytes_over_tokens():
    text, held_out = load_text("handbook")[:6000], load_text("dialogues")[:2000]
    bpe = BPETokenizer.train(text, 40)
    rows = compression_by_merges(bpe, [0, 40], text, held_out)
    assert [(r["merges"], r["vocab"]) for r in rows] == [(0, 256), (40, 296)]
    assert rows[0]["train_bytes_per_token"] == rows[0]["val_bytes_per_token"] == 1.0  # a token per byte
    assert rows[1]["train_bytes_per_token"] == len(text.encode()) / len(bpe.encode(text)) > 1
    assert rows[1]["val_bytes_per_token"] == len(held_out.encode()) / len(bpe.encode(held_out)) > 1
    given = compression_by_merges(bpe, [40], text, held_out, train_bytes=1000)[0]
    assert given["train_bytes_per_token"] == 1000 / len(bpe.encode(text))


def test_heaps_curve_is_the_fit_of_the_type_curve():
    text = load_text("dialogues")
    curve = heaps_curve(text)
    n, v = types_vs_tokens(word_tokens(text))
    assert (curve["n"], curve["types_at_n"], curve["words"], curve["types"]) == (n, v, n[-1], v[-1])
    assert {k: curve[k] for k in ("K", "beta", "r2")} == fit_heaps(n, v).to_dict()


def test_wordpiece_vs_bpe_counts_tokens_per_word_and_unknowns():
    text = load_text("handbook")[:8000]
    wp, bpe = WordPieceTokenizer.train(text, 300), BPETokenizer.train(text, 40)
    held_out = "parallel ranks 日本"  # 3 words; the handbook's first 8 KB have no 日: one [UNK]
    stats = wordpiece_vs_bpe(wp, bpe, held_out, ["ranks"])
    pieces = wp.tokens(held_out)
    assert pieces[-1] == "[UNK]" and stats["val_unknown"] == 1 / len(pieces)
    assert stats["val_tokens_per_word"] == len(pieces) / 3
    assert stats["bpe_val_tokens_per_word"] == len(bpe.encode(held_out)) / 3
    assert stats["splits"] == {"ranks": wp.tokens("ranks")} and stats["vocab"] == 300
    assert stats["hf_identical"] is True  # tokenizers is in the [test] extra


def test_pieces_table_and_the_figures(tmp_path):
    """Lab 00's printed splits (left-aligned, a leading space as ▁) and its two PNGs."""
    table = pieces_table({"tokenization": {"morphemes": "token|iz|ation", "BPE": [" to", "ken", "ization"]},
                          "ab": {"BPE": ["a", "b"]}})
    assert table.splitlines() == ["word          morphemes       BPE",
                                  "tokenization  token|iz|ation  ▁to|ken|ization",
                                  "ab            -               a|b"]
    bpe = BPETokenizer.train(load_text("dialogues"), 20)
    rows = compression_by_merges(bpe, [0, 10, 20], load_text("dialogues"), load_text("handbook")[:3000])
    growth = {"dialogues": heaps_curve(load_text("dialogues"))}
    sizes = bpe_compression(bpe, {"train": load_text("dialogues")[:3000]}, [256, 276])
    for path in (compression_plot(rows, tmp_path / "c.png", "dialogues"),
                 vocab_growth_plot(growth, sizes, tmp_path / "sub" / "v.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
