"""Lab 00: tokens and n-grams, the counting baseline neural LMs are measured against.

    python labs/00_tokens_and_ngrams.py                    # ~1 minute on a 2-core CPU
    python labs/00_tokens_and_ngrams.py --gpt-steps 0      # skip gpt-mini (unless lab 01 saved one)

What to look at:
* a byte-level BPE learned from scratch: its first merges (' t', 'th', ' the', ...), how words
  split at 0, 100, 500, 2000 merges next to their morphemes (BPE knows frequency, not meaning);
* compression: bytes per token rising with the merge count, a little less on held-out text;
* WordPiece (BERT) trained to the same size by its likelihood score: other splits, more tokens
  per word, [UNK] for what it never saw, ids equal to Hugging Face tokenizers' WordPiece;
* vocabulary growth: distinct words keep coming as text grows, V = K n^beta (Heaps' law, fitted
  on both corpora), and bytes per token vs BPE vocabulary size on train, held-out and another text;
* n-gram perplexity vs n: add-k collapses as n grows (unseen n-grams take the mass),
  interpolated Kneser-Ney keeps improving;
* one table of held-out perplexity *per byte* (so byte and BPE models compare) with gpt-mini:
  lab 01's checkpoint if present, else a brief training run with the shared train loop. On this
  70 KB corpus the 5-gram Kneser-Ney wins (about 4.1 per byte against about 10 for lab 01's
  gpt-mini): most held-out 5-grams occur in the training text, and gpt-mini is undertrained.
  notes/ngrams.md works out why, and when neural models win instead.
Each cell below is one step; the package does the work (journey_dist.tokenizer, vocab_growth,
ngram) and each step prints one table.
Results: runs/00_tokens_and_ngrams/result.json, compression.png and vocab_growth.png.
"""

# %% Setup: arguments and every check that can fail, before the work starts
import time

import torch

from journey_dist.config import ConfigError, GPTConfig, get_preset
from journey_dist.data import load_text, load_tokens
from journey_dist.labkit import check_data, lab_parser, nonnegative_int, parse, positive_int
from journey_dist.model import GPT
from journey_dist.ngram import (
    best_per_byte,
    model_stream_nll,
    per_byte_perplexity,
    per_byte_table,
    perplexity_by_order,
    perplexity_table,
)
from journey_dist.plots import compression_plot, vocab_growth_plot
from journey_dist.report import pieces_table
from journey_dist.runtime import runs_dir, save_json, seed_everything
from journey_dist.tokenizer import BPETokenizer, WordPieceTokenizer
from journey_dist.train import TrainConfig, train
from journey_dist.vocab_growth import (
    bpe_compression,
    bytes_per_token_table,
    compression_by_merges,
    compression_table,
    heaps_curve,
    heaps_table,
    wordpiece_line,
    wordpiece_vs_bpe,
)

LAB = "00_tokens_and_ngrams"
MAX_N = 10  # every n from 1 to --max-n is fitted 6 times (2 tokenizations x 3 smoothings)
GPT_BATCH = 16
parser = lab_parser(__doc__)
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--merges", type=nonnegative_int, default=2000, help="BPE merges to learn")
parser.add_argument("--ngram-merges", type=nonnegative_int, default=500,
                    help="BPE size for the n-gram models")
parser.add_argument("--max-n", type=positive_int, default=5, help=f"largest n-gram order (at most {MAX_N})")
parser.add_argument("--gpt-steps", type=nonnegative_int, default=150,
                    help="steps if lab 01's checkpoint is absent (0: no gpt-mini row)")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

if args.ngram_merges > args.merges:
    raise ConfigError(f"--ngram-merges={args.ngram_merges} exceeds --merges={args.merges}; use "
                      f"--ngram-merges <= {args.merges}")
if args.max_n > MAX_N:
    raise ConfigError(f"--max-n {args.max_n}: every order up to it is fitted 6 times; use --max-n <= {MAX_N}")
seed_everything(0)
data = load_tokens(args.data, level="byte")  # the same 90/10 split lab 01 trains on
lab01 = runs_dir("01_single_device") / "model.pt"
if not lab01.is_file() and args.gpt_steps > 0:  # gpt-mini is trained here on this text
    check_data(parser, data, GPT_BATCH, get_preset("gpt-mini").block_size)
elif len(data.val) < 2:  # per-byte perplexities need held-out text; the n-grams need training text
    raise ConfigError(f"{args.data} has {len(data.train) + len(data.val)} bytes, too few to hold out 10% "
                      "for validation; pass --data a longer text (a few KB at least)")
train_text = bytes(data.train.tolist()).decode("utf-8", errors="replace")
val_text = bytes(data.val.tolist()).decode("utf-8", errors="replace")
val_bytes = len(val_text.encode("utf-8"))
MORPHEMES = {"unbelievably": "un|believ|abl|y", "tokenization": "token|iz|ation",
             "parallelism": "parallel|ism", "recomputation": "re|comput|ation",
             "misunderstanding": "mis|under|stand|ing"}


# %% 1. Train a byte-level BPE from scratch (GPT-2 pre-split, 256 byte tokens + merges)
t0 = time.perf_counter()
bpe = BPETokenizer.train(train_text, args.merges, special_tokens=["<|endoftext|>"])
train_s = time.perf_counter() - t0
first_merges = [bpe.token_str(256 + i) for i in range(min(50, len(bpe.merges)))]
print(f"{args.data}: {len(data.train):,} train / {len(data.val):,} held-out bytes; {len(bpe.merges)} merges "
      f"in {train_s:.2f} s (vocabulary {bpe.vocab_size}): {', '.join(map(repr, first_merges[:12]))}, ...")

# %% 2. Morphemes vs BPE pieces: BPE splits by frequency in this corpus, not by meaning
counts = [m for m in (0, 100, 500, 2000) if m <= len(bpe.merges)]
splits = {word: {m: bpe.truncated(m).tokens(" " + word) for m in counts} for word in MORPHEMES}
print(pieces_table({w: {"morphemes": MORPHEMES[w], **{f"{m} merges": splits[w][m] for m in counts}}
                    for w in MORPHEMES}))

# %% 3. Compression: bytes per token as merges grow (held-out text compresses a little less)
grid = sorted({m for m in (0, 25, 50, 100, 200, 500, 1000, 1500, 2000, args.merges) if m <= args.merges})
compression = compression_by_merges(bpe, grid, train_text, val_text, train_bytes=len(data.train))
png = compression_plot(compression, runs_dir(LAB) / "compression.png", args.data)
print(compression_table(compression))

# %% 4. WordPiece (BERT): merges scored by likelihood, count(ab) / (count(a) count(b)), not by count
wp = WordPieceTokenizer.train(train_text, bpe.vocab_size)  # lowercased, BERT's pre-split, ## pieces
wordpiece = wordpiece_vs_bpe(wp, bpe, val_text, MORPHEMES)
print(pieces_table({w: {f"BPE {counts[-1]}": splits[w][counts[-1]], f"WordPiece {wp.vocab_size}": p}
                    for w, p in wordpiece["splits"].items()}) + "\n" + wordpiece_line(wordpiece))

# %% 5. Vocabulary growth: new words never stop coming (Heaps' law), so tokenizers use subwords
growth = {name: heaps_curve(load_text(name)) for name in ("handbook", "dialogues")}
largest = 256 + len(bpe.merges)
sizes = sorted({s for s in (256, 384, 512, 1024, 1536, 2048) if s < largest} | {largest})
texts = {"train": train_text, "held-out": val_text, "dialogues": load_text("dialogues")}
vocab_rows = bpe_compression(bpe, texts, sizes)
growth_png = vocab_growth_plot(growth, vocab_rows, runs_dir(LAB) / "vocab_growth.png")
print(heaps_table(growth) + "\n" + bytes_per_token_table(vocab_rows, f"learned on {args.data} train"))

# %% 6. n-gram perplexity vs n, over bytes and over BPE tokens
ngram_tok = bpe.truncated(args.ngram_merges)
streams = {"bytes": (data.train.tolist(), data.val.tolist(), 256),
           f"bpe-{args.ngram_merges}": (ngram_tok.encode(train_text), ngram_tok.encode(val_text),
                                       ngram_tok.vocab_size)}
ngram_rows = perplexity_by_order(streams, args.max_n, val_bytes)
print(perplexity_table(ngram_rows))


# %% 7. gpt-mini on the same held-out bytes: lab 01's checkpoint, or a brief run of the shared loop
def gpt_mini() -> tuple[GPT | None, str | None]:
    """The model and where it came from; (None, None) when there is no checkpoint and --gpt-steps 0."""
    if lab01.is_file():
        saved = torch.load(lab01, map_location="cpu")
        model = GPT(GPTConfig(**saved["config"]))
        model.load_state_dict(saved["model"])
        return model, f"lab 01 checkpoint {lab01}"
    if args.gpt_steps == 0:
        return None, None
    model = GPT(get_preset("gpt-mini"))
    train(model, data, TrainConfig(steps=args.gpt_steps, batch_size=GPT_BATCH,
                                   log_every=max(1, args.gpt_steps // 5)), lab=LAB)
    return model, f"trained here for {args.gpt_steps} steps (run lab 01 for a better model)"


model, gpt_source = gpt_mini()
gpt_row = None if model is None else {  # every held-out byte after the first, predicted once
    "model": "gpt-mini (bytes)", "source": gpt_source,
    "val_ppl_byte": per_byte_perplexity(model_stream_nll(model, data.val), len(data.val) - 1)}

# %% 8. One table: held-out perplexity per byte (bits/byte = log2 of it), n-grams and gpt-mini
per_byte = best_per_byte(ngram_rows) + ([gpt_row] if gpt_row else [])
print(per_byte_table(per_byte, val_bytes) + (f"\ngpt-mini: {gpt_source}" if gpt_row else ""))

# %% Save
path = save_json(LAB, "result", {
    "data": args.data, "merges": len(bpe.merges), "bpe_train_seconds": train_s, "first_merges": first_merges,
    "splits": splits, "morphemes": MORPHEMES, "compression": compression, "ngram": ngram_rows,
    "per_byte_table": per_byte, "plot": str(png), "wordpiece": wordpiece, "heaps": growth,
    "bpe_vocab_bytes_per_token": vocab_rows, "vocab_growth_plot": str(growth_png),
})
print(f"wrote {path}, {png.name} and {growth_png.name}")
