"""Byte-level BPE (the GPT-2 tokenizer) trained from scratch.

    tok = BPETokenizer.train(text, num_merges=2000, special_tokens=["<|endoftext|>"])
    ids = tok.encode("unbelievably")          # list[int]
    tok.decode(ids) == "unbelievably"
    tok.save("bpe.json"); BPETokenizer.load("bpe.json")

How it works:
1. Pre-split: a GPT-2-style regex cuts text into chunks (words with their leading space,
   numbers, punctuation runs, whitespace). Merges never cross a chunk boundary, so " the"
   becomes one token but "the." never does.
2. Start from the 256 byte values: every text (any language, emoji) is representable.
3. Training repeats: count adjacent pairs in all chunks (weighted by how often each chunk
   occurs), merge the most frequent pair into a new token id 256, 257, ... Counts are updated
   incrementally (only chunks that contain the merged pair are recounted) and the best pair is
   kept in a heap with lazy deletion, so 2000 merges on the 78 KB handbook take well under a
   second.
4. Encoding a chunk applies the learned merges by rank (earliest learned first), as GPT-2 does.

Ties are broken exactly as Hugging Face `tokenizers`' BpeTrainer breaks them (highest count,
then the smallest pair of HF ids, where HF numbers the 256 bytes in the order of GPT-2's
byte-to-unicode characters and new tokens after them), so on the same chunks the merges are
identical to HF's ByteLevel BPE (tests/test_tokenizer.py checks it).

The pre-split pattern uses only the standard `re` module. GPT-2's pattern needs \\p{L} and
\\p{N}; here letters are `[^\\W\\d_]` and numbers `\\d`. The one difference: numeric characters
that are not decimal digits (categories Nl/No: '²', '½', 'Ⅻ') count as letters here and as
numbers in GPT-2. On the embedded corpora the chunks are identical to HF's (tested).
"""

from __future__ import annotations

import heapq
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

# GPT-2's pattern: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)
_SPLIT = re.compile(GPT2_SPLIT_PATTERN)

Pair = tuple[int, int]


def split_chunks(text: str) -> list[str]:
    """Cut text into pre-tokenization chunks; merges never cross their boundaries."""
    return _SPLIT.findall(text)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters (how HF stores byte tokens).

    Printable Latin-1 bytes map to themselves; the rest (control characters, space, ...)
    to code points 256 and up, so ' ' (byte 32) is shown as 'Ġ' and '\\n' as 'Ċ'.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


# HF's id for each byte: bytes sorted by their byte-to-unicode character. Used only to break
# ties between equally frequent pairs the same way HF does.
_BYTE_RANK = {b: r for r, (b, _) in enumerate(sorted(bytes_to_unicode().items(), key=lambda kv: kv[1]))}


def _rank(token: int) -> int:
    return _BYTE_RANK[token] if token < 256 else token


def _pair_key(pair: Pair) -> tuple[int, int]:
    return _rank(pair[0]), _rank(pair[1])


def merge_word(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `word`, scanning left to right (no overlaps)."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_merges(chunk_counts: dict[str, int] | Counter, num_merges: int,
                 min_frequency: int = 1) -> list[Pair]:
    """Learn up to `num_merges` merges from chunk -> count; token 256 + i is merge i.

    Stops early when no pair occurs `min_frequency` times (or at all).
    """
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    pair_counts: Counter = Counter()
    where: dict[Pair, set[int]] = {}  # pair -> indices of words that (may) contain it
    for w, (word, c) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += c
            where.setdefault(pair, set()).add(w)
    # max-heap via negated counts; entries go stale when a count drops and are re-pushed lazily
    heap = [(-c, _pair_key(p), p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while len(merges) < num_merges and heap:
        neg, _, pair = heapq.heappop(heap)
        current = pair_counts.get(pair, 0)
        if current != -neg:  # stale entry: re-queue with the true count
            if current > 0:
                heapq.heappush(heap, (-current, _pair_key(pair), pair))
            continue
        if current < max(min_frequency, 1):
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        grown: set[Pair] = set()
        for w in where.pop(pair):
            word, c = words[w], counts[w]
            merged = merge_word(word, pair, new_id)
            if len(merged) == len(word):
                continue  # stale index: the pair left this word in an earlier merge
            for p in zip(word, word[1:]):  # recount this word: remove old windows, add new
                pair_counts[p] -= c
            for p in zip(merged, merged[1:]):
                pair_counts[p] += c
                if new_id in p:
                    grown.add(p)
                    where.setdefault(p, set()).add(w)
            words[w] = merged
        pair_counts.pop(pair, None)
        for p in grown:  # only pairs with the new token can gain counts
            heapq.heappush(heap, (-pair_counts[p], _pair_key(p), p))
    return merges


class BPETokenizer:
    """Byte-level BPE: 256 byte tokens, then one token per merge, then special tokens."""

    def __init__(self, merges: list[Pair], special_tokens: list[str] | None = None,
                 pattern: str = GPT2_SPLIT_PATTERN):
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.pattern = pattern
        self._split = re.compile(pattern)
        self.vocab: list[bytes] = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.special_tokens = {s: len(self.vocab) + i for i, s in enumerate(special_tokens or [])}
        self._special_bytes = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._special_re = (re.compile("(" + "|".join(map(re.escape, sorted(
            self.special_tokens, key=len, reverse=True))) + ")") if self.special_tokens else None)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, num_merges: int, special_tokens: list[str] | None = None,
              min_frequency: int = 1, pattern: str = GPT2_SPLIT_PATTERN) -> BPETokenizer:
        """Learn `num_merges` merges from `text` (special tokens are cut out first)."""
        pieces = [text]
        if special_tokens:
            pieces = re.split("|".join(map(re.escape, special_tokens)), text)
        split = re.compile(pattern)
        chunk_counts = Counter(c for piece in pieces for c in split.findall(piece))
        return cls(train_merges(chunk_counts, num_merges, min_frequency), special_tokens, pattern)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a special token's UTF-8 text)."""
        return self.vocab[token] if token < len(self.vocab) else self._special_bytes[token]

    def _encode_chunk(self, chunk: str) -> list[int]:
        if chunk in self._cache:
            return self._cache[chunk]
        word = list(chunk.encode("utf-8"))
        while len(word) > 1:
            # the earliest-learned merge present in the chunk goes first
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            word = merge_word(word, pair, 256 + self.ranks[pair])
        if len(self._cache) < 100_000:
            self._cache[chunk] = word
        return word

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ignoring special tokens (their text is encoded as ordinary bytes)."""
        return [t for chunk in self._split.findall(text) for t in self._encode_chunk(chunk)]

    def encode(self, text: str, allowed_special: bool = True) -> list[int]:
        """Encode text; with `allowed_special`, '<|endoftext|>' etc. become their single id."""
        if not allowed_special or self._special_re is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for piece in self._special_re.split(text):
            if piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Concatenate token bytes and decode UTF-8 (invalid sequences become U+FFFD)."""
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")

    def token_str(self, token: int) -> str:
        """A token as text (a piece of a multi-byte character shows as U+FFFD)."""
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def tokens(self, text: str) -> list[str]:
        """The pieces a text is cut into, as readable strings (for showing splits)."""
        return [self.token_str(t) for t in self.encode(text)]

    def truncated(self, num_merges: int) -> BPETokenizer:
        """The tokenizer after only the first `num_merges` merges (same special tokens)."""
        return BPETokenizer(self.merges[:num_merges], list(self.special_tokens), self.pattern)

    def hf_merges(self) -> list[tuple[str, str]]:
        """Merges written the way HF's ByteLevel BPE stores them ('Ġ', 't')."""
        b2u = bytes_to_unicode()
        show = lambda tok: "".join(b2u[b] for b in self.vocab[tok])  # noqa: E731
        return [(show(a), show(b)) for a, b in self.merges]

    def save(self, path: str | Path) -> None:
        """Write merges, special tokens and the split pattern as JSON."""
        Path(path).write_text(json.dumps({
            "type": "byte-level-bpe", "pattern": self.pattern,
            "special_tokens": list(self.special_tokens), "merges": [list(m) for m in self.merges],
        }, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        data = json.loads(Path(path).read_text())
        return cls([tuple(m) for m in data["merges"]], data["special_tokens"], data["pattern"])


# --------------------------------------------------------------------------- WordPiece (BERT)


def _is_space(ch: str) -> bool:
    # Rust's char::is_whitespace (what HF tokenizers uses); Python's isspace() also counts the
    # information separators U+001C..U+001F, which Rust does not
    return ch.isspace() and not "\x1c" <= ch <= "\x1f"


def _is_bert_punctuation(ch: str) -> bool:
    # HF's BertPreTokenizer: ASCII punctuation (including $ + < = > ^ ` | ~) or Unicode category P*
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def bert_pre_tokenize(text: str) -> list[str]:
    """BERT's pre-split: drop whitespace, every punctuation character a word of its own."""
    words, current = [], []
    for ch in text:
        if _is_space(ch) or _is_bert_punctuation(ch):
            if current:
                words.append("".join(current))
                current = []
            if not _is_space(ch):
                words.append(ch)
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


def train_wordpiece(word_counts: dict[str, int] | Counter, vocab_size: int,
                    special_tokens: tuple[str, ...] = ("[UNK]",), prefix: str = "##") -> list[str]:
    """Learn a WordPiece vocabulary: special tokens, the alphabet, then merges up to vocab_size.

    Words start as characters, every non-initial one carrying the continuation prefix
    ("word" -> w ##o ##r ##d). Each step merges the pair (a, b) with the highest score
        count(a b) / (count(a) x count(b)),
    the gain in a unigram model's likelihood from treating "ab" as one unit (counts weighted by
    word frequency): a pair of symbols that mostly occur together wins over a pair of common
    ones that only sometimes do. The new token is a followed by b without its prefix. Ties: the
    more frequent pair, then the alphabetically first. Scores are kept in a heap; after a merge
    every pair that contains a, b or the new token is re-scored (their counts are what changed).
    """
    words = [[w[0]] + [prefix + c for c in w[1:]] for w in word_counts]
    counts = list(word_counts.values())
    vocab = list(dict.fromkeys([*special_tokens, *sorted({t for w in words for t in w})]))
    freq: Counter = Counter()
    pair_count: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    pairs_of: dict[str, set[tuple[str, str]]] = {}
    for i, (word, c) in enumerate(zip(words, counts)):
        for t in word:
            freq[t] += c
        for pair in zip(word, word[1:]):
            pair_count[pair] += c
            where.setdefault(pair, set()).add(i)

    def score(pair: tuple[str, str]) -> float:
        return pair_count[pair] / (freq[pair[0]] * freq[pair[1]])

    for pair in pair_count:
        for t in pair:
            pairs_of.setdefault(t, set()).add(pair)
    heap = [(-score(p), -pair_count[p], p) for p in pair_count]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg_score, _, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) <= 0 or -neg_score != score(pair):
            continue  # stale: a fresher entry for this pair was pushed when it changed
        a, b = pair
        new = a + b[len(prefix):]
        vocab.append(new)
        touched: set[tuple[str, str]] = set()
        for i in where.pop(pair, ()):
            word, c = words[i], counts[i]
            merged, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and word[j] == a and word[j + 1] == b:
                    merged.append(new)
                    freq[a] -= c
                    freq[b] -= c
                    freq[new] += c
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            if len(merged) == len(word):
                continue  # stale index entry
            for p in zip(word, word[1:]):
                pair_count[p] -= c
                touched.add(p)
            for p in zip(merged, merged[1:]):
                pair_count[p] += c
                touched.add(p)
                where.setdefault(p, set()).add(i)
            words[i] = merged
        for p in touched:
            for t in p:
                group = pairs_of.setdefault(t, set())
                (group.add if pair_count[p] > 0 else group.discard)(p)
        rescore = touched | pairs_of.get(a, set()) | pairs_of.get(b, set()) | pairs_of.get(new, set())
        for p in rescore:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-score(p), -pair_count[p], p))
    return vocab


class WordPieceTokenizer:
    """WordPiece encoding: BERT's pre-split, then greedy longest-match-first per word.

    Within a word, take the longest vocabulary entry that starts it, then the longest that starts
    the rest (looked up with the continuation prefix, "##"), and so on; if some position matches
    nothing, or the word is longer than max_input_chars_per_word characters, the whole word is
    the unknown token. This is Hugging Face tokenizers' WordPiece model with BertPreTokenizer
    (and a Lowercase normalizer when lowercase=True); tests/test_tokenizer.py checks the ids.
    """

    def __init__(self, vocab: list[str], unk_token: str = "[UNK]", prefix: str = "##",
                 max_input_chars_per_word: int = 100, lowercase: bool = True):
        if unk_token not in vocab:
            raise ValueError(f"unk_token {unk_token!r} is not in the vocabulary; put it first, as train does")
        self.vocab, self.ids = list(vocab), {t: i for i, t in enumerate(vocab)}
        self.unk_token, self.prefix = unk_token, prefix
        self.max_input_chars_per_word, self.lowercase = max_input_chars_per_word, lowercase
        self._longest = max(len(t) for t in vocab)

    @classmethod
    def train(cls, text: str, vocab_size: int, lowercase: bool = True,
              special_tokens: tuple[str, ...] = ("[UNK]",), prefix: str = "##") -> WordPieceTokenizer:
        """Learn a vocabulary of vocab_size entries from text (train_wordpiece)."""
        counts = Counter(bert_pre_tokenize(text.lower() if lowercase else text))
        return cls(train_wordpiece(counts, vocab_size, special_tokens, prefix), special_tokens[0], prefix,
                   lowercase=lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split_word(self, word: str) -> list[str]:
        """Greedy longest-match-first pieces of one pre-split word ([unk] if it cannot be covered)."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_token]
        pieces, start = [], 0
        while start < len(word):
            end = min(len(word), start + self._longest)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.ids:
                    break
                end -= 1
            else:
                return [self.unk_token]
            pieces.append(piece)
            start = end
        return pieces

    def tokens(self, text: str) -> list[str]:
        text = text.lower() if self.lowercase else text
        return [p for word in bert_pre_tokenize(text) for p in self.split_word(word)]

    def encode(self, text: str) -> list[int]:
        return [self.ids[t] for t in self.tokens(text)]

    def decode(self, ids: list[int]) -> str:
        """Pieces joined by spaces, continuation pieces glued to the one before (not lossless:
        the pre-split dropped whitespace and case)."""
        return " ".join(self.vocab[i] for i in ids).replace(" " + self.prefix, "")


def hf_wordpiece(tok: WordPieceTokenizer):
    """The same vocabulary as a Hugging Face `tokenizers` WordPiece model with BertPreTokenizer
    (and Lowercase when tok.lowercase): the reference our encoding is checked against."""
    # deferred: tokenizers is an optional dependency (the [test] extra, or with transformers)
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    hf = Tokenizer(models.WordPiece(dict(tok.ids), unk_token=tok.unk_token,
                                    continuing_subword_prefix=tok.prefix,
                                    max_input_chars_per_word=tok.max_input_chars_per_word))
    if tok.lowercase:
        hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return hf
