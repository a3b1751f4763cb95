"""How a vocabulary grows with text: Heaps' law for word types, BPE size vs bytes per token.

    words = word_tokens(load_text("handbook"))
    n, v = types_vs_tokens(words)             # distinct words after the first n words
    fit = fit_heaps(n, v)                      # V(n) ~ K n^beta: fit.K, fit.beta
    bpe_compression(bpe, {"handbook": text}, sizes=[256, 512, 1024])

Heaps' law (Herdan 1960, Heaps 1978): the number of distinct words V in a text of n words grows
as K n^beta with beta < 1 (typically 0.4 to 0.6 for English): new words keep coming, ever more
slowly, so no word-level vocabulary is ever complete, which is why tokenizers fall back to
subwords (BPE, WordPiece) or bytes. The fit is least squares on log V = log K + beta log n over
log-spaced points of the curve (each decade weighs the same).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from journey_dist.tokenizer import BPETokenizer

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
