"""How a vocabulary grows with text: Heaps' law for word types, BPE size vs bytes per token.

    words = word_tokens(load_text("handbook"))
    n, v = types_vs_tokens(words)             # distinct words after the first n words
    fit = fit_heaps(n, v)                      # V(n) ~ K n^beta: fit.K, fit.beta
    bpe_compression(bpe, {"handbook": text}, sizes=[256, 512, 1024])
    compression_by_merges(bpe, [0, 100, 500], train_text, held_out_text)
    wordpiece_vs_bpe(wordpiece, bpe, held_out_text, words=["tokenization"])

Heaps' law (Herdan 1960, Heaps 1978): the number of distinct words V in a text of n words grows
as K n^beta with beta < 1 (typically 0.4 to 0.6 for English): new words keep coming, ever more
slowly, so no word-level vocabulary is ever complete, which is why tokenizers fall back to
subwords (BPE, WordPiece) or bytes. The fit is least squares on log V = log K + beta log n over
log-spaced points of the curve (each decade weighs the same).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from journey_dist.report import Column, fixed, table
from journey_dist.tokenizer import BPETokenizer, WordPieceTokenizer, bert_pre_tokenize, hf_wordpiece

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # letters, with inner apostrophes (don't, o'clock)


def word_tokens(text: str) -> list[str]:
    """Lowercased words: runs of letters (digits and punctuation are not words here)."""
    return _WORD.findall(text.lower())


def types_vs_tokens(words: Sequence[str], points: int = 40) -> tuple[list[int], list[int]]:
    """(n, V(n)) at about `points` log-spaced n from 1 to len(words): distinct words among the first n."""
    marks = sorted({max(1, round(len(words) ** (i / (points - 1)))) for i in range(points)})
    seen, n_out, v_out, m = set(), [], [], 0
    for i, w in enumerate(words, 1):
        seen.add(w)
        if i == marks[m]:
            n_out.append(i)
            v_out.append(len(seen))
            m += 1
            if m == len(marks):
                break
    return n_out, v_out


@dataclass
class HeapsFit:
    K: float
    beta: float
    r2: float  # of the fit in log space

    def predict(self, n: float) -> float:
        return self.K * n ** self.beta

    def to_dict(self) -> dict:
        return asdict(self)


def fit_heaps(n: Sequence[float], v: Sequence[float], min_n: int = 100) -> HeapsFit:
    """Least-squares fit of log V = log K + beta log n over the points with n >= min_n (the first
    few words are all new, a regime the power law does not describe)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(n, v) if a >= min_n]
    if len(pts) < 2:
        raise ValueError(f"need at least two points with n >= {min_n} words to fit Heaps' law")
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    beta = sum((x - mx) * (y - my) for x, y in pts) / sxx
    log_k = my - beta * mx
    ss_res = sum((y - log_k - beta * x) ** 2 for x, y in pts)
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    return HeapsFit(math.exp(log_k), beta, 1 - ss_res / ss_tot)


def bpe_compression(bpe: BPETokenizer, texts: dict[str, str], sizes: Sequence[int]) -> list[dict]:
    """Bytes per token of each text under the first (size - 256) merges of `bpe`, per vocabulary size
    (the special tokens are not counted in the size)."""
    rows = []
    for size in sizes:
        if not 256 <= size <= 256 + len(bpe.merges):
            raise ValueError(f"vocabulary size {size} outside [256, {256 + len(bpe.merges)}] for this BPE")
        tok = bpe.truncated(size - 256)
        rows.append({"vocab": size, **{name: len(t.encode()) / len(tok.encode_ordinary(t))
                                       for name, t in texts.items()}})
    return rows


def heaps_curve(text: str) -> dict:
    """The word-type curve of `text` and its Heaps fit: {words, types, K, beta, r2, n, types_at_n}."""
    n, v = types_vs_tokens(word_tokens(text))
    return {"words": n[-1], "types": v[-1], **fit_heaps(n, v).to_dict(), "n": n, "types_at_n": v}


def compression_by_merges(bpe: BPETokenizer, merges: Sequence[int], train: str, held_out: str,
                          train_bytes: int | None = None) -> list[dict]:
    """Bytes per token of the training and the held-out text under the first m merges of `bpe`
    (`encode`), for each m: rows {merges, vocab, train_bytes_per_token, val_bytes_per_token}.
    `train_bytes` defaults to the training text's UTF-8 length."""
    train_bytes = len(train.encode("utf-8")) if train_bytes is None else train_bytes
    held_out_bytes = len(held_out.encode("utf-8"))
    rows = []
    for m in merges:
        tok = bpe.truncated(m)
        rows.append({"merges": m, "vocab": 256 + m,
                     "train_bytes_per_token": train_bytes / len(tok.encode(train)),
                     "val_bytes_per_token": held_out_bytes / len(tok.encode(held_out))})
    return rows


def wordpiece_vs_bpe(wp: WordPieceTokenizer, bpe: BPETokenizer, held_out: str, words: Sequence[str]) -> dict:
    """WordPiece next to BPE on held-out text: tokens per (BERT pre-split) word for each, the
    share of [UNK], the pieces of `words`; and, when Hugging Face tokenizers is installed,
    "hf_identical": its WordPiece with this vocabulary gives the same ids."""
    n_words = len(bert_pre_tokenize(held_out))
    pieces = wp.tokens(held_out)
    stats = {"vocab": wp.vocab_size, "splits": {w: wp.tokens(w) for w in words},
             "val_tokens_per_word": len(pieces) / n_words,
             "val_unknown": pieces.count(wp.unk_token) / len(pieces),
             "bpe_val_tokens_per_word": len(bpe.encode(held_out)) / n_words}
    if importlib.util.find_spec("tokenizers"):
        stats["hf_identical"] = wp.encode(held_out) == hf_wordpiece(wp).encode(held_out).ids
    return stats


def compression_table(rows: list[dict]) -> str:
    """compression_by_merges rows: merges, vocabulary, bytes per token on train and held-out text."""
    return table(rows, [("merges", "merges", str), ("vocab", "vocab", str),
                        ("train_bytes_per_token", "bytes/token train", fixed(2)),
                        ("val_bytes_per_token", "held-out", fixed(2))])


def wordpiece_line(stats: dict) -> str:
    """wordpiece_vs_bpe in two lines: tokens per held-out word and [UNK] share, and HF parity."""
    hf = (f"Hugging Face tokenizers' WordPiece with this vocabulary: same ids on held-out text: "
          f"{stats['hf_identical']}" if "hf_identical" in stats else
          "(Hugging Face tokenizers is not installed: tests/test_wordpiece.py has the parity check)")
    return (f"held-out: WordPiece {stats['val_tokens_per_word']:.2f} tokens per word "
            f"({stats['val_unknown']:.2%} [UNK]), BPE {stats['bpe_val_tokens_per_word']:.2f} "
            f"(notes/bpe.md says why)\n{hf}")


def heaps_table(growth: dict[str, dict]) -> str:
    """heaps_curve per corpus: words read, distinct words, and the fit V = K n^beta."""
    rows = [{"corpus": name, **g} for name, g in growth.items()]
    return table(rows, [("corpus", "corpus", str), ("words", "words", "{:,}".format),
                        ("types", "distinct", "{:,}".format), ("K", "Heaps K", fixed(2)),
                        ("beta", "beta", fixed(3)), ("r2", "R^2 (log space)", fixed(4))])


def bytes_per_token_table(rows: list[dict], trained_on: str) -> str:
    """bpe_compression rows: bytes per token of each text per BPE vocabulary size."""
    texts = [k for k in rows[0] if k != "vocab"]
    cols: list[Column] = [("vocab", f"BPE vocabulary ({trained_on})", str),
                          *((t, f"bytes/token {t}", fixed(2)) for t in texts)]
    return table(rows, cols)
