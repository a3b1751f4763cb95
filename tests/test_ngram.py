"""n-gram LMs: distributions sum to 1, train perplexity falls with n, Kneser-Ney beats add-k."""

import math

import pytest
import torch

from journey_dist.config import get_preset
from journey_dist.data import load_text
from journey_dist.model import GPT
from journey_dist.ngram import (
    NGramLM,
    best_per_byte,
    model_stream_nll,
    per_byte_perplexity,
    per_byte_table,
    perplexity_by_order,
)
from journey_dist.tokenizer import BPETokenizer
from tests.labs import run_lab


@pytest.fixture(scope="module")
def split() -> tuple[list[int], list[int]]:
    text = load_text("handbook")
    return list(text[:20000].encode()), list(text[20000:25000].encode())


@pytest.mark.parametrize("smoothing,k", [("addk", 1.0), ("addk", 0.01), ("kn", 0.0)])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_distribution_sums_to_one(split, smoothing, k, n):
    train, val = split
    lm = NGramLM(n, 256, smoothing, k).fit(train)
    for context in ([], train[:3], train[500:503], val[7:10], [0, 1, 2]):  # seen, unseen, empty
        probs = lm.distribution(context)
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-9)
        assert min(probs) > 0.0


def test_kneser_ney_train_perplexity_falls_with_n(split):
    train, _ = split
    ppl = [NGramLM(n, 256, "kn").fit(train).perplexity(train[:4000]) for n in (1, 2, 3, 4, 5)]
    assert all(a > b for a, b in zip(ppl, ppl[1:])), ppl


def test_add_one_train_perplexity_does_not_keep_falling(split):
    # what is true: add-1 spreads so much mass over unseen n-grams that beyond n=2 even the
    # training text gets *less* likely (with 256 byte types, 256^(n-1) contexts dilute it)
    train, _ = split
    ppl = [NGramLM(n, 256, "addk", 1.0).fit(train).perplexity(train[:4000]) for n in (1, 2, 3, 4)]
    assert ppl[1] < ppl[0] and ppl[3] > ppl[2] > ppl[1], ppl


@pytest.mark.parametrize("n", [2, 3, 4])
def test_kneser_ney_beats_add_k_on_held_out(split, n):
    train, val = split
    kn = NGramLM(n, 256, "kn").fit(train).perplexity(val)
    best_addk = min(NGramLM(n, 256, "addk", k).fit(train).perplexity(val) for k in (1.0, 0.1, 0.01))
    assert kn < best_addk, (kn, best_addk)


def test_unigram_kn_is_close_to_add_k():
    # with n = 1 there is nothing to back off to: both are (smoothed) relative frequencies
    ids = list(load_text("handbook")[:5000].encode())
    kn = NGramLM(1, 256, "kn").fit(ids).perplexity(ids)
    addk = NGramLM(1, 256, "addk", 0.01).fit(ids).perplexity(ids)
    assert abs(kn - addk) / addk < 0.01


def test_per_byte_perplexity_compares_tokenizers(split):
    # the same text under bytes and BPE: per-token perplexities differ a lot, per-byte ones
    # are comparable (and a unigram over BPE tokens beats a unigram over bytes)
    train, val = (bytes(x).decode() for x in split)
    tok = BPETokenizer.train(train, 200)
    results = {}
    for name, enc in (("bytes", lambda s: list(s.encode())), ("bpe", tok.encode)):
        lm = NGramLM(1, 256 if name == "bytes" else tok.vocab_size, "kn").fit(enc(train))
        results[name] = (lm.perplexity(enc(val)), per_byte_perplexity(lm.nll(enc(val)), len(val.encode())))
    assert results["bpe"][0] > 5 * results["bytes"][0]  # per token: not comparable
    assert results["bpe"][1] < results["bytes"][1]  # per byte: BPE's unigram knows whole words


def test_model_stream_nll_scores_every_token_once():
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    ids = torch.randint(0, 256, (70,))
    total = model_stream_nll(model, ids, block_size=32)
    # untrained: each of the 69 predicted tokens costs about ln(256)
    assert abs(total / 69 - math.log(256)) < 0.2
    # the same sum by hand: windows [0:33], [32:65], [64:70]
    by_hand = 0.0
    for s in (0, 32, 64):
        w = ids[s:s + 33]
        _, loss = model(w[None, :-1], w[None, 1:])
        by_hand += loss.item() * (len(w) - 1)
    assert math.isclose(total, by_hand, rel_tol=1e-5)


@pytest.mark.slow
def test_lab_00_runs(tmp_path):
    _, result = run_lab("00_tokens_and_ngrams", "--merges", "300", "--ngram-merges", "100", "--max-n", "3",
                        "--gpt-steps", "3", runs_dir=tmp_path, timeout_s=300)
    assert result["merges"] == 300 and (tmp_path / "00_tokens_and_ngrams" / "compression.png").is_file()
    ratios = [r["val_bytes_per_token"] for r in result["compression"]]
    assert ratios == sorted(ratios)
    assert any(r["model"].startswith("gpt-mini") for r in result["per_byte_table"])
    # the WordPiece and vocabulary-growth cells: HF parity, Heaps' law fitted, compression vs size
    assert result["wordpiece"]["vocab"] == 300 + 256 + 1 and result["wordpiece"]["hf_identical"]
    for corpus in ("handbook", "dialogues"):
        assert 0 < result["heaps"][corpus]["beta"] < 1 and result["heaps"][corpus]["r2"] > 0.98
    sizes = [r["vocab"] for r in result["bpe_vocab_bytes_per_token"]]
    assert sizes[0] == 256 and sizes[-1] == 556
    assert (tmp_path / "00_tokens_and_ngrams" / "vocab_growth.png").is_file()
    held_out = [r["held-out"] for r in result["bpe_vocab_bytes_per_token"]]
    assert held_out == sorted(held_out)


def test_perplexity_by_order_fits_each_smoothing_then_keeps_the_best_per_byte(split):
    """Lab 00's sweep: one row per (smoothing, n), the numbers of an NGramLM fitted alone; the
    per-byte table keeps the unigram, the best add-k and the best Kneser-Ney, worst first."""
    train, held_out = split[0][:5000], split[1][:1000]
    rows = perplexity_by_order({"bytes": (train, held_out, 256)}, 2, held_out_bytes=500)
    assert [(r["smoothing"], r["n"]) for r in rows] == [("add-1", 1), ("add-1", 2), ("add-0.01", 1),
                                                        ("add-0.01", 2), ("kn", 1), ("kn", 2)]
    lm = NGramLM(2, 256, "kn").fit(train)
    assert rows[-1]["val_ppl_token"] == pytest.approx(lm.perplexity(held_out), rel=1e-12)
    assert rows[-1]["val_ppl_byte"] == pytest.approx(math.exp(lm.nll(held_out) / 500), rel=1e-12)
    assert rows[-1]["train_ppl_token"] == pytest.approx(lm.perplexity(train), rel=1e-12)
    best = best_per_byte(rows)
    assert [b["model"] for b in best] == ["1-gram kn (bytes, unigram)", "2-gram add-0.01 (bytes, best add-k)",
                                          "2-gram kn (bytes, best Kneser-Ney)"]
    unigram, add_k, kn = (b["val_ppl_byte"] for b in best)
    assert kn == rows[-1]["val_ppl_byte"] < add_k < unigram
    lines = per_byte_table(best, 500).splitlines()
    assert [line.split("  ")[0] for line in lines[1:]] == [b["model"] for b in best]  # worst first
    assert lines[-1].endswith(f"{math.log2(best[2]['val_ppl_byte']):.2f}")  # bits per byte
