"""Text in, token batches out: the embedded corpus, char/byte tokens, per-rank batches.

Batches are a pure function of (seed, step): every rank draws the same *global*
batch and keeps its own slice. So a data-parallel run on N ranks sees exactly the
rows a single process sees for the global batch, which is what parity tests need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from journey_dist.config import ConfigError

CORPORA = ("handbook", "dialogues")


def load_text(source: str = "handbook") -> str:
    """Text of an embedded corpus ('handbook', 'dialogues') or of a UTF-8 file path."""
    if source in CORPORA:
        return resources.files("journey_dist").joinpath(f"corpus/{source}.txt").read_text("utf-8")
    path = Path(source)
    if path.is_dir():
        raise ConfigError(f"data path {source!r} is a directory; pass a UTF-8 text file or one of the "
                          f"embedded corpora: {', '.join(CORPORA)}")
    if not path.is_file():
        raise ConfigError(
            f"data file {source!r} not found; pass an existing text file or one of the "
            f"embedded corpora: {', '.join(CORPORA)}"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{source} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
            f"convert it first, e.g. `iconv -f latin1 -t utf-8 {source} > {path.stem}.utf8.txt`"
        ) from None
    if not text:
        raise ConfigError(f"data file {source} is empty; pass a text file with at least a few KB of text "
                          f"or one of the embedded corpora: {', '.join(CORPORA)}")
    return text


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no unknowns, any text round-trips."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class CharTokenizer:
    """One token per distinct character of the training text (smaller vocab than bytes)."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char vocabulary; build the "
                             "CharTokenizer from text that contains it, or use the ByteTokenizer") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


@dataclass
class TokenData:
    """A tokenised corpus split into train/val streams."""

    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    tokenizer: ByteTokenizer | CharTokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def load_tokens(source: str = "handbook", level: str = "byte", val_fraction: float = 0.1) -> TokenData:
    """Tokenise a corpus at 'byte' or 'char' level; the last `val_fraction` is validation."""
    text = load_text(source)
    if level == "byte":
        tok: ByteTokenizer | CharTokenizer = ByteTokenizer()
    elif level == "char":
        tok = CharTokenizer(text)
    else:
        raise ConfigError(f"level={level!r}; use 'byte' or 'char'")
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    n_val = int(len(ids) * val_fraction)
    return TokenData(ids[: len(ids) - n_val], ids[len(ids) - n_val:], tok)


def check_fits(data: TokenData, batch_size: int, block_size: int, *,
               flags: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError before training when the text cannot feed this batch shape.

    A sample needs block_size+1 tokens; validation needs the same from the held-out tail; and a
    batch asking for more tokens than the training text holds would repeat the text every step
    (batches sample start positions with replacement, so nothing else would complain).
    `flags` spells the fix in a program's own flags: {"data": "--data", "batch_size": "--batch-size"};
    without them the fix names the parameters.
    """
    flags = flags or {}
    batch = flags.get("batch_size")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer; use "
                          f"{batch or 'batch_size'} >= 1")
    longer = f"pass {flags['data']} a longer text" if "data" in flags else "use a longer text"
    for split, tokens in (("training", data.train), ("validation", data.val)):
        if len(tokens) <= block_size + 1:
            need = 10 * (block_size + 2)  # the last 10% is validation and needs block_size+2 tokens too
            fix = (f"{longer} (at least {need:,} tokens: the last 10% is validation)" if "data" in flags else
                   f"{longer} (the last 10% is validation) or a smaller block_size (at most "
                   f"{max(1, len(tokens) - 2)})")
            raise ConfigError(f"the {split} text has {len(tokens)} tokens but a sample needs block_size+1 = "
                              f"{block_size + 1}; {fix}")
    if batch_size * block_size > len(data.train):
        most = max(1, len(data.train) // block_size)
        raise ConfigError(
            f"one batch of {batch_size} x {block_size} = {batch_size * block_size:,} tokens is "
            f"larger than the training text ({len(data.train):,} tokens): every step would see "
            f"the same text several times; use {batch or 'batch_size'} <= {most} or "
            f"{longer.removeprefix('use ')}"
        )


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int, step: int,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch for `step`: (x, y) each (batch_size, block_size), y = x shifted by one.

    Deterministic in (seed, step), independent of rank and world size.
    """
    if len(tokens) <= block_size + 1:
        raise ConfigError(
            f"the text has {len(tokens)} tokens but a sample needs block_size+1 = "
            f"{block_size + 1}; use a longer text or a smaller block_size"
        )
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=g)
    x = torch.stack([tokens[s: s + block_size] for s in starts.tolist()])
    y = torch.stack([tokens[s + 1: s + 1 + block_size] for s in starts.tolist()])
    return x, y


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rows [rank*B/W, (rank+1)*B/W) of a global batch (B must divide by W)."""
    if batch.size(0) % world_size:
        raise ConfigError(
            f"global batch {batch.size(0)} does not divide over {world_size} ranks; "
            f"use a multiple of {world_size}"
        )
    per = batch.size(0) // world_size
    return batch[rank * per: (rank + 1) * per]


def microbatches(x: torch.Tensor, y: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split (x, y) into n equal microbatches along the batch dimension."""
    if x.size(0) % n:
        raise ConfigError(f"batch {x.size(0)} does not split into {n} microbatches; use a batch that is a "
                          f"multiple of {n} or a microbatch count that divides {x.size(0)}")
    return list(zip(x.chunk(n), y.chunk(n)))
