"""n-gram language models over token ids: add-k and interpolated Kneser-Ney, perplexity.

    lm = NGramLM(n=3, vocab_size=256, smoothing="kn").fit(train_ids)
    lm.prob(token, context)            # P(token | last n-1 tokens of context)
    lm.distribution(context)           # all vocab_size probabilities (they sum to 1)
    lm.perplexity(val_ids)             # exp(mean negative log-likelihood per token)

Every position is scored; the first n-2 positions use the shorter context they have.

Add-k: P(w|h) = (c(h,w) + k) / (c(h) + k V). Unseen contexts get the uniform 1/V.

Interpolated Kneser-Ney (Chen & Goodman 1998), one discount D per order (Ney's estimate
D = n1 / (n1 + 2 n2) from the counts of counts):
    P(w|h) = max(c(h,w) - D, 0) / c(h)  +  D N1+(h .) / c(h) * P_lower(w|h')
with h' = h without its oldest token. The top order uses raw counts c; lower orders use
continuation counts N1+(. h' w), the number of distinct tokens seen before h' w ("how many
contexts does w complete", which is why "Francisco" gets a low unigram probability even
though it is frequent). Order 1 interpolates with the uniform 1/V, so every token of the
vocabulary keeps some mass and each distribution sums to exactly 1.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from journey_dist.report import fixed, table

Context = tuple[int, ...]
SMOOTHINGS = (("addk", 1.0), ("addk", 0.01), ("kn", 0.0))  # (smoothing, k) lab 00 compares


class NGramLM:
    """An n-gram model over ids 0..vocab_size-1 with 'addk' or 'kn' smoothing."""

    def __init__(self, n: int, vocab_size: int, smoothing: str = "kn", k: float = 1.0):
        if n < 1:
            raise ValueError(f"n={n} must be >= 1; use n=1 (unigram) or more")
        if smoothing not in ("addk", "kn"):
            raise ValueError(f"smoothing={smoothing!r}; use 'addk' or 'kn'")
        self.n, self.vocab_size, self.smoothing, self.k = n, vocab_size, smoothing, k
        # counts[m][h][w]: raw count of h + (w,) with len(h) = m - 1, for m = 1..n
        self.counts: list[dict[Context, Counter]] = [defaultdict(Counter) for _ in range(n + 1)]
        # cont[m][h][w]: number of distinct tokens x with x + h + (w,) seen (m < n)
        self.cont: list[dict[Context, Counter]] = [defaultdict(Counter) for _ in range(n + 1)]
        self.discount = [0.0] * (n + 1)

    def fit(self, ids: Sequence[int]) -> NGramLM:
        ids = list(ids)
        for m in range(1, self.n + 1):
            for i in range(m - 1, len(ids)):
                self.counts[m][tuple(ids[i - m + 1:i])][ids[i]] += 1
        for m in range(1, self.n):  # continuation counts from the distinct (m+1)-grams
            for h, followers in self.counts[m + 1].items():
                for w in followers:
                    self.cont[m][h[1:]][w] += 1
        for m in range(1, self.n + 1):
            table = self.counts[m] if m == self.n else self.cont[m]
            self.discount[m] = _ney_discount(table)
        self._totals = [{h: sum(c.values()) for h, c in t.items()} for t in self.counts]
        self._cont_totals = [{h: sum(c.values()) for h, c in t.items()} for t in self.cont]
        return self

    def prob(self, token: int, context: Sequence[int] = ()) -> float:
        """P(token | context); only the last n-1 tokens of the context matter."""
        h = tuple(context[max(0, len(context) - self.n + 1):]) if self.n > 1 else ()
        if self.smoothing == "addk":
            c = self.counts[len(h) + 1].get(h)
            seen, total = (c[token], self._totals[len(h) + 1][h]) if c else (0, 0)
            return (seen + self.k) / (total + self.k * self.vocab_size)
        return self._kn(token, h, top=True)

    def _kn(self, w: int, h: Context, top: bool) -> float:
        m = len(h) + 1
        lower = 1.0 / self.vocab_size if m == 1 else self._kn(w, h[1:], top=False)
        # the order we start from uses raw counts; every order below it continuation counts
        table, totals = (self.counts[m], self._totals[m]) if top else (self.cont[m], self._cont_totals[m])
        followers = table.get(h)
        if not followers:
            return lower
        d, total = self.discount[m], totals[h]
        return max(followers[w] - d, 0.0) / total + d * len(followers) / total * lower

    def distribution(self, context: Sequence[int] = ()) -> list[float]:
        """P(w | context) for every w in the vocabulary."""
        return [self.prob(w, context) for w in range(self.vocab_size)]

    def nll(self, ids: Sequence[int]) -> float:
        """Total negative log-likelihood (nats) of every token given the ones before it."""
        ids = list(ids)
        return -sum(math.log(self.prob(ids[i], ids[max(0, i - self.n + 1):i])) for i in range(len(ids)))

    def perplexity(self, ids: Sequence[int]) -> float:
        """exp(mean NLL per token). Compare across tokenizers with `per_byte_perplexity`."""
        return math.exp(self.nll(ids) / max(1, len(ids)))


def _ney_discount(table: dict[Context, Counter]) -> float:
    """D = n1 / (n1 + 2 n2): n1, n2 = how many n-grams occur exactly once, twice."""
    counts = Counter(c for followers in table.values() for c in followers.values())
    n1, n2 = counts[1], counts[2]
    return n1 / (n1 + 2 * n2) if n1 + n2 else 0.5


def per_byte_perplexity(total_nll: float, n_bytes: int) -> float:
    """exp(total nats / bytes): comparable across tokenizers (bits/byte = log2 of it)."""
    return math.exp(total_nll / n_bytes)


def model_stream_nll(model: torch.nn.Module, ids: Sequence[int] | torch.Tensor,
                     block_size: int | None = None) -> float:
    """Total NLL (nats) a GPT assigns to every token after the first of a 1-D id stream.

    The stream is cut into windows of block_size + 1 that overlap by one token, so each
    token is predicted exactly once, from the tokens before it in its window.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    block_size = block_size or model.config.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block_size):
            window = ids[start:start + block_size + 1].to(device)
            logits, _ = model(window[None, :-1])
            total += F.cross_entropy(logits[0].float(), window[1:], reduction="sum").item()
    model.train(was_training)
    return total


def perplexity_by_order(streams: dict[str, tuple[Sequence[int], Sequence[int], int]], max_n: int,
                        held_out_bytes: int, smoothings: Sequence[tuple[str, float]] = SMOOTHINGS
                        ) -> list[dict]:
    """Fit every smoothing at every order 1..max_n on each token stream {name: (training ids,
    held-out ids, vocabulary size)}. Rows {tokens, smoothing, n, train_ppl_token (on the first
    20,000 training tokens), val_ppl_token, val_ppl_byte (over `held_out_bytes`)}."""
    rows = []
    for tokens, (train, held_out, vocab) in streams.items():
        for smoothing, k in smoothings:
            for n in range(1, max_n + 1):
                lm = NGramLM(n, vocab, smoothing, k).fit(train)
                val_nll = lm.nll(held_out)
                name = "kn" if smoothing == "kn" else f"add-{k:g}"
                rows.append({"tokens": tokens, "smoothing": name, "n": n,
                             "train_ppl_token": lm.perplexity(train[:20000]),
                             "val_ppl_token": math.exp(val_nll / len(held_out)),
                             "val_ppl_byte": per_byte_perplexity(val_nll, held_out_bytes)})
    return rows


def best_per_byte(rows: list[dict]) -> list[dict]:
    """Per tokenization of perplexity_by_order's rows: the unigram, the best add-k and the best
    Kneser-Ney by held-out perplexity per byte, as rows {model, val_ppl_byte}."""
    best = []
    for tokens in dict.fromkeys(r["tokens"] for r in rows):
        mine = [r for r in rows if r["tokens"] == tokens]
        for label, pick in (("unigram", [r for r in mine if r["n"] == 1 and r["smoothing"] == "kn"]),
                            ("best add-k", [r for r in mine if r["smoothing"] != "kn"]),
                            ("best Kneser-Ney", [r for r in mine if r["smoothing"] == "kn"])):
            r = min(pick, key=lambda r: r["val_ppl_byte"])
            best.append({"model": f"{r['n']}-gram {r['smoothing']} ({tokens}, {label})",
                         "val_ppl_byte": r["val_ppl_byte"]})
    return best


def perplexity_table(rows: list[dict]) -> str:
    """perplexity_by_order rows: per tokenization, smoothing and n, perplexity per token (train,
    held-out) and per held-out byte."""
    return table(rows, [("tokens", "tokens", str), ("smoothing", "smoothing", str), ("n", "n", str),
                        ("train_ppl_token", "train ppl/token", fixed(2)),
                        ("val_ppl_token", "held-out ppl/token", fixed(2)),
                        ("val_ppl_byte", "held-out ppl/byte", fixed(3))])


def per_byte_table(rows: list[dict], held_out_bytes: int) -> str:
    """Rows {model, val_ppl_byte}, worst first, with bits per byte (log2 of the perplexity)."""
    worst_first = sorted(rows, key=lambda r: -r["val_ppl_byte"])
    ranked = [{**r, "bits": math.log2(r["val_ppl_byte"])} for r in worst_first]
    return table(ranked, [("model", f"held-out ({held_out_bytes:,} bytes; uniform: 256)", str),
                          ("val_ppl_byte", "ppl/byte", fixed(3)), ("bits", "bits/byte", fixed(2))])
