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
Results: runs/00_tokens_and_ngrams/result.json, compression.png and vocab_growth.png.
"""

# %% Setup: arguments and every check that can fail, before the work starts
import importlib.util
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from journey_dist.config import ConfigError, GPTConfig, get_preset
from journey_dist.data import load_text, load_tokens
from journey_dist.labkit import check_data, lab_parser, nonnegative_int, parse, positive_int
from journey_dist.model import GPT
from journey_dist.ngram import NGramLM, model_stream_nll, per_byte_perplexity
from journey_dist.runtime import runs_dir, save_json, seed_everything
from journey_dist.tokenizer import BPETokenizer, WordPieceTokenizer, bert_pre_tokenize, hf_wordpiece
from journey_dist.train import TrainConfig, train
from journey_dist.vocab_growth import bpe_compression, fit_heaps, types_vs_tokens, word_tokens

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
print(f"corpus {args.data}: {len(data.train):,} train / {len(data.val):,} held-out bytes")


# %% Train a byte-level BPE from scratch (GPT-2 pre-split, 256 byte tokens + merges)
t0 = time.perf_counter()
bpe = BPETokenizer.train(train_text, args.merges, special_tokens=["<|endoftext|>"])
train_s = time.perf_counter() - t0
print(f"\nlearned {len(bpe.merges)} merges in {train_s:.2f} s; vocabulary {bpe.vocab_size} "
      f"(256 bytes + merges + <|endoftext|>)")
print("first 12 merges:", ", ".join(repr(bpe.token_str(256 + i)) for i in range(min(12, len(bpe.merges)))))

# %% Morphemes vs BPE tokens: BPE splits by frequency in this corpus, not by meaning
MORPHEMES = {"unbelievably": "un|believ|abl|y", "tokenization": "token|iz|ation",
             "parallelism": "parallel|ism", "recomputation": "re|comput|ation",
             "misunderstanding": "mis|under|stand|ing"}
counts = [m for m in (0, 100, 500, 2000) if m <= len(bpe.merges)]
print("\nword (mid-sentence, so with its leading space, shown as ▁) | morphemes | BPE pieces at "
      + ", ".join(f"{m} merges" for m in counts))
splits = {}
for word, morphemes in MORPHEMES.items():
    splits[word] = {m: bpe.truncated(m).tokens(" " + word) for m in counts}
    shown = ("|".join(splits[word][m]).replace(" ", "▁") for m in counts)
    print(f"  {word:<18} {morphemes:<22} " + "  ".join(shown))

# %% Compression: bytes per token as merges grow (held-out text compresses a little less)
grid = sorted({m for m in (0, 25, 50, 100, 200, 500, 1000, 1500, 2000, args.merges) if m <= args.merges})
compression = []
for m in grid:
    tok = bpe.truncated(m)
    compression.append({"merges": m, "vocab": 256 + m,
                        "train_bytes_per_token": len(data.train) / len(tok.encode(train_text)),
                        "val_bytes_per_token": val_bytes / len(tok.encode(val_text))})
print("\nmerges | vocab | bytes/token train | held-out")
for r in compression:
    print(f"  {r['merges']:5d} | {r['vocab']:5d} | {r['train_bytes_per_token']:.2f} | "
          f"{r['val_bytes_per_token']:.2f}")
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(grid, [r["train_bytes_per_token"] for r in compression], "o-", label="train text")
ax.plot(grid, [r["val_bytes_per_token"] for r in compression], "s--", label="held-out text")
ax.set(xlabel="BPE merges (vocabulary = 256 + merges)", ylabel="bytes per token",
       title=f"BPE compression on {args.data}")
ax.grid(alpha=0.3)
ax.legend()
png = runs_dir(LAB) / "compression.png"
png.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(png, dpi=120, bbox_inches="tight")
print(f"plot: {png}")

# %% WordPiece (BERT): merges scored by likelihood, count(ab) / (count(a) count(b)), not by count
wp = WordPieceTokenizer.train(train_text, bpe.vocab_size)  # lowercased, BERT's pre-split, ## pieces
print(f"\nWordPiece trained to {wp.vocab_size} entries, as many as the BPE; word | BPE | WordPiece")
for word in MORPHEMES:
    shown = "|".join(splits[word][counts[-1]]).replace(" ", "▁")
    print(f"  {word:<18} {shown:<30} {'|'.join(wp.tokens(word))}")
val_words = len(bert_pre_tokenize(val_text))
wp_val = wp.tokens(val_text)
wordpiece = {"vocab": wp.vocab_size, "splits": {w: wp.tokens(w) for w in MORPHEMES},
             "val_tokens_per_word": len(wp_val) / val_words,
             "val_unknown": wp_val.count(wp.unk_token) / len(wp_val),
             "bpe_val_tokens_per_word": len(bpe.encode(val_text)) / val_words}
print(f"held-out: WordPiece {wordpiece['val_tokens_per_word']:.2f} tokens per word "
      f"({wordpiece['val_unknown']:.2%} [UNK]), BPE {wordpiece['bpe_val_tokens_per_word']:.2f} (BPE also "
      f"spends tokens on spaces, and never needs [UNK]); the likelihood score spends merges on rare "
      f"pairs that always occur together")
if importlib.util.find_spec("tokenizers"):
    wordpiece["hf_identical"] = wp.encode(val_text) == hf_wordpiece(wp).encode(val_text).ids
    print(f"Hugging Face tokenizers' WordPiece with this vocabulary: same ids on held-out text: "
          f"{wordpiece['hf_identical']}")
else:
    print("(Hugging Face tokenizers is not installed: tests/test_wordpiece.py has the parity check)")

# %% Vocabulary growth: new words never stop coming (Heaps' law), so tokenizers use subwords
growth = {}
fig, (ax_heaps, ax_vocab) = plt.subplots(1, 2, figsize=(11, 4))
print("\ncorpus | words | distinct | Heaps fit V = K n^beta: K, beta (R^2 in log space)")
for name in ("handbook", "dialogues"):
    n, v = types_vs_tokens(word_tokens(load_text(name)))
    fit = fit_heaps(n, v)
    growth[name] = {"words": n[-1], "types": v[-1], **fit.to_dict(), "n": n, "types_at_n": v}
    print(f"  {name:<9} | {n[-1]:6,} | {v[-1]:5,} | K = {fit.K:.2f}, beta = {fit.beta:.3f} "
          f"(R^2 {fit.r2:.4f})")
    ax_heaps.loglog(n, v, "o", ms=3, label=name)
    ax_heaps.loglog(n, [fit.predict(x) for x in n], "-", lw=1, label=f"{fit.K:.1f} n^{fit.beta:.2f}")
ax_heaps.set(xlabel="words read (n)", ylabel="distinct words V(n)", title="Heaps' law")
ax_heaps.legend()
largest = 256 + len(bpe.merges)
sizes = sorted({s for s in (256, 384, 512, 1024, 1536, 2048) if s < largest} | {largest})
texts = {"train": train_text, "held-out": val_text, "dialogues": load_text("dialogues")}
vocab_rows = bpe_compression(bpe, texts, sizes)
print(f"BPE vocabulary (learned on {args.data} train) | bytes per token: train, held-out, dialogues")
for r in vocab_rows:
    print(f"  {r['vocab']:5d} | {r['train']:.2f} {r['held-out']:.2f} {r['dialogues']:.2f}")
for key, style in (("train", "o-"), ("held-out", "s--"), ("dialogues", "^:")):
    ax_vocab.plot(sizes, [r[key] for r in vocab_rows], style, label=key)
ax_vocab.set(xscale="log", xlabel="BPE vocabulary size", ylabel="bytes per token",
             title="compression vs vocabulary")
ax_vocab.legend()
growth_png = runs_dir(LAB) / "vocab_growth.png"
fig.savefig(growth_png, dpi=120, bbox_inches="tight")
print(f"plot: {growth_png}")

# %% n-gram perplexity vs n, over bytes and over BPE tokens
ngram_tok = bpe.truncated(args.ngram_merges)
streams = {"bytes": (data.train.tolist(), data.val.tolist(), 256),
           f"bpe-{args.ngram_merges}": (ngram_tok.encode(train_text), ngram_tok.encode(val_text),
                                       ngram_tok.vocab_size)}
ngram_rows = []
print("\ntokens | smoothing | n | train ppl/token | held-out ppl/token | held-out ppl/byte")
for tokens, (tr, va, vocab) in streams.items():
    for smoothing, k in (("addk", 1.0), ("addk", 0.01), ("kn", 0.0)):
        for n in range(1, args.max_n + 1):
            lm = NGramLM(n, vocab, smoothing, k).fit(tr)
            val_nll = lm.nll(va)
            row = {"tokens": tokens, "smoothing": "kn" if smoothing == "kn" else f"add-{k:g}", "n": n,
                   "train_ppl_token": lm.perplexity(tr[:20000]), "val_ppl_token": math.exp(val_nll / len(va)),
                   "val_ppl_byte": per_byte_perplexity(val_nll, val_bytes)}
            ngram_rows.append(row)
            print(f"  {tokens:<9} {row['smoothing']:<9} {n} | {row['train_ppl_token']:9.2f} | "
                  f"{row['val_ppl_token']:9.2f} | {row['val_ppl_byte']:6.3f}")

# %% gpt-mini on the same held-out bytes: lab 01's checkpoint, or a brief run of the shared loop
gpt_source = None
if lab01.is_file():
    saved = torch.load(lab01, map_location="cpu")
    model = GPT(GPTConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    gpt_source = f"lab 01 checkpoint {lab01}"
elif args.gpt_steps > 0:
    model = GPT(get_preset("gpt-mini"))
    cfg = TrainConfig(steps=args.gpt_steps, batch_size=GPT_BATCH, log_every=max(1, args.gpt_steps // 5))
    train(model, data, cfg, lab=LAB)
    gpt_source = f"trained here for {args.gpt_steps} steps (run lab 01 for a better model)"
gpt_row = None
if gpt_source:
    nll = model_stream_nll(model, data.val)  # every held-out byte after the first, predicted once
    gpt_row = {"model": "gpt-mini (bytes)", "source": gpt_source,
               "val_ppl_byte": per_byte_perplexity(nll, len(data.val) - 1)}

# %% One table: held-out perplexity per byte (bits/byte = log2 of it)
table = []
for tokens in streams:  # per tokenization: the unigram, the best add-k and the best Kneser-Ney
    rows = [r for r in ngram_rows if r["tokens"] == tokens]
    for label, pick in (("unigram", [r for r in rows if r["n"] == 1 and r["smoothing"] == "kn"]),
                        ("best add-k", [r for r in rows if r["smoothing"] != "kn"]),
                        ("best Kneser-Ney", [r for r in rows if r["smoothing"] == "kn"])):
        r = min(pick, key=lambda r: r["val_ppl_byte"])
        table.append({"model": f"{r['n']}-gram {r['smoothing']} ({tokens}, {label})",
                      "val_ppl_byte": r["val_ppl_byte"]})
if gpt_row:
    table.append(gpt_row)
print(f"\nheld-out perplexity per byte ({val_bytes:,} bytes; uniform over bytes would be 256):")
for r in sorted(table, key=lambda r: -r["val_ppl_byte"]):
    print(f"  {r['model']:<40} {r['val_ppl_byte']:8.3f}   ({math.log2(r['val_ppl_byte']):.2f} bits/byte)")
if gpt_row:
    print(f"gpt-mini: {gpt_source}")

# %% Save
path = save_json(LAB, "result", {
    "data": args.data, "merges": len(bpe.merges), "bpe_train_seconds": train_s,
    "first_merges": [bpe.token_str(256 + i) for i in range(min(50, len(bpe.merges)))],
    "splits": splits, "morphemes": MORPHEMES, "compression": compression, "ngram": ngram_rows,
    "per_byte_table": table, "plot": str(png), "wordpiece": wordpiece, "heaps": growth,
    "bpe_vocab_bytes_per_token": vocab_rows, "vocab_growth_plot": str(growth_png),
})
print(f"wrote {path}")
