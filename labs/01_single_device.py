"""Lab 01: train GPT-mini on one device.

    python labs/01_single_device.py              # ~1.5 minutes on an idle 2-core CPU
    python labs/01_single_device.py --steps 50   # quicker look

Timing: 300 steps of 16 x 128 bytes, about 614K tokens at 8-10K tokens/s when the 2 cores are
free (81 s in all); on a shared machine it stretches (8.6 minutes at a load average of 4-10).

What to look at: the shapes through one block, the loss falling from ln(256) = 5.55
(a uniform guess over bytes) to about 2.3 in 300 steps, and a sample with English-like
words and spacing (more steps help: try --steps 1500). Last, RoPE's rotation on one vector,
and four position schemes trained at 32 tokens and read at 64 (--positions-steps 0 skips it): each
pair of q's (and k's) channels turns by position x its own angle, so q.k depends only on the
offset; llama-mini's switches at 2 layers train one model per scheme, and the loss on 64-token
windows is split at position 32.
Results: runs/01_single_device/{train,result,positions}.json; the checkpoint is reused by later labs.
"""

# %% Setup: arguments and every check that can fail, before the work starts
import math

import torch

from journey_dist.config import get_preset
from journey_dist.data import load_tokens
from journey_dist.extrapolation import extrapolation_config, position_extrapolation, positions_table
from journey_dist.labkit import (
    check_data,
    check_memory,
    lab_parser,
    nonnegative_int,
    parse,
    positive_float,
    positive_int,
    resolve_device,
)
from journey_dist.model import GPT, trace_shapes
from journey_dist.positions import rope_demo_text, rope_shift_invariance
from journey_dist.report import shapes_table
from journey_dist.runtime import runs_dir, save_json, seed_everything
from journey_dist.train import TrainConfig, train

LAB = "01_single_device"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--steps", type=positive_int, default=300)
parser.add_argument("--batch-size", type=positive_int, default=16)
parser.add_argument("--lr", type=positive_float, default=3e-3)
parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
parser.add_argument("--positions-steps", type=nonnegative_int, default=150,
                    help="training steps per position scheme in the last cell (0 skips it)")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

seed_everything(0)
device = resolve_device(args.device)
data = load_tokens(args.data, level="byte")
config = get_preset(args.preset, vocab_size=data.vocab_size)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  log_every=max(1, args.steps // 10))
model = GPT(config).to(device)
print(f"device: {device} | corpus: {args.data}, {len(data.train):,} train / {len(data.val):,} val bytes | "
      f"{args.preset}: {model.num_params():,} parameters (embedding shared with the output head)\n{config}")


# %% 1. Shapes through the model: ids (B, T) -> embeddings (B, T, C) -> logits (B, T, V)
x = data.train[: 2 * 16].view(2, 16).to(device)  # B=2 sequences of T=16 bytes
shapes = [(name, shape) for name, shape in trace_shapes(model, x, depth=5)
          if ".h." not in name or name.startswith("transformer.h.0")]  # one block: the others repeat it
print(shapes_table(shapes, "module (B=2 sequences of T=16 bytes)"))

# %% 2. Train: the loss starts near ln(vocab), the loss of a uniform guess, and falls
uniform = math.log(config.vocab_size)  # the loss of a uniform guess over the vocabulary
history = train(model, data, cfg, lab=LAB)
print(f"loss {history.first_loss:.3f} (uniform guess {uniform:.3f}) -> {history.last_loss:.3f}, "
      f"validation {history.val_loss:.3f}; {history.tokens_per_s:,.0f} tokens/s")

# %% 3. Generate: continue a prompt
ids = torch.tensor([data.tokenizer.encode("Tensor parallelism")], device=device)
out = model.generate(ids, max_new_tokens=120, temperature=0.8, top_k=40,
                     generator=torch.Generator(device=device).manual_seed(0))
sample = data.tokenizer.decode(out[0].tolist())
print(f"\nsample:\n{sample}\n")

# %% 4. Save a checkpoint (labs 00, 08 and 13 reuse it) and the result
ckpt = runs_dir(LAB) / "model.pt"
ckpt.parent.mkdir(parents=True, exist_ok=True)
torch.save({"config": config.to_dict(), "model": model.state_dict()}, ckpt)
path = save_json(LAB, "result", {
    "preset": args.preset, "params": model.num_params(), "device": str(device),
    "first_loss": history.first_loss, "last_loss": history.last_loss,
    "val_loss": history.val_loss, "tokens_per_s": history.tokens_per_s,
    "sample": sample, "checkpoint": str(ckpt),
})
print(f"wrote {path} and {ckpt}")

# %% 5. Position encodings: rotate q and k (RoPE), then see which schemes carry past the training length
if args.positions_steps > 0:
    demo = rope_shift_invariance(head_dim=8, m=3, n=7, shift=100)
    small = extrapolation_config(data.vocab_size)
    rows = position_extrapolation(data, small, steps=args.positions_steps, device=device)
    path = save_json(LAB, "positions", {
        "rope_demo": {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in demo.items()},
        "config": small.to_dict(), "rows": rows})
    print(f"\nRoPE on one q and k:\n{rope_demo_text(demo)}\n{positions_table(rows)}\nwrote {path}")
