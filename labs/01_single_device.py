"""Lab 01: train GPT-mini on one device.

    python labs/01_single_device.py              # ~1.5 minutes on an idle 2-core CPU
    python labs/01_single_device.py --steps 50   # quicker look

Timing: 300 steps of 16 x 128 bytes, about 614K tokens at 8-10K tokens/s when the 2 cores are
free (81 s in all); on a shared machine it stretches (8.6 minutes at a load average of 4-10).

What to look at: the shapes through one block, the loss falling from ln(256) = 5.55
(a uniform guess over bytes) to about 2.3 in 300 steps, and a sample with English-like
words and spacing (more steps help: try --steps 1500).
Results: runs/01_single_device/{train,result}.json; the checkpoint is reused by later labs.
"""

# %% Setup: arguments and every check that can fail, before the work starts
import math

import torch

from journey_dist.config import get_preset
from journey_dist.data import load_tokens
from journey_dist.labkit import (
    check_data,
    check_memory,
    lab_parser,
    parse,
    positive_float,
    positive_int,
    resolve_device,
)
from journey_dist.model import GPT, trace_shapes
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
print(f"device: {device} | corpus: {args.data}, {len(data.train):,} train / {len(data.val):,} val bytes")
print(f"model: {args.preset} {config}")
print(f"parameters: {model.num_params():,} (embedding matrix shared with the output head)")


# %% Shapes through the model: ids (B, T) -> embeddings (B, T, C) -> logits (B, T, V)
x = data.train[: 2 * 16].view(2, 16).to(device)
print("\nshapes for a batch of B=2 sequences of T=16 bytes:")
for name, shape in trace_shapes(model, x, depth=5):
    if ".h." in name and not name.startswith("transformer.h.0"):
        continue  # one block is enough: the others repeat it
    print(f"  {name:<32} {shape}")

# %% Train: the loss starts near ln(vocab) and falls
print(f"\nuniform-guess loss ln({config.vocab_size}) = {math.log(config.vocab_size):.3f}")
history = train(model, data, cfg, lab=LAB)
print(f"loss {history.first_loss:.3f} -> {history.last_loss:.3f}; "
      f"validation loss {history.val_loss:.3f}; {history.tokens_per_s:,.0f} tokens/s")

# %% Generate: continue a prompt
prompt = "Tensor parallelism"
ids = torch.tensor([data.tokenizer.encode(prompt)], device=device)
out = model.generate(ids, max_new_tokens=120, temperature=0.8, top_k=40,
                     generator=torch.Generator(device=device).manual_seed(0))
sample = data.tokenizer.decode(out[0].tolist())
print(f"\nsample:\n{sample}\n")

# %% Save a checkpoint and the result
ckpt = runs_dir("01_single_device") / "model.pt"
ckpt.parent.mkdir(parents=True, exist_ok=True)
torch.save({"config": config.to_dict(), "model": model.state_dict()}, ckpt)
path = save_json("01_single_device", "result", {
    "preset": args.preset, "params": model.num_params(), "device": str(device),
    "first_loss": history.first_loss, "last_loss": history.last_loss,
    "val_loss": history.val_loss, "tokens_per_s": history.tokens_per_s,
    "sample": sample, "checkpoint": str(ckpt),
})
print(f"wrote {path} and {ckpt}")
