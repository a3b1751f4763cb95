"""Position encodings past the training length: lab 01's last cell, committed for the notes.

    python benchmarks/positions.py    # writes benchmarks/results/positions.{json,md}

Trains llama-mini's switches at 2 layers x 64 channels once per scheme (learned, sinusoidal,
RoPE, ALiBi) for the lab's 150 steps at 32 tokens on the handbook corpus, then measures the loss
on 64-token validation windows, on positions 0..31 (seen in training) and 32..63 (never seen).
Same seed and batches for every scheme (journey_dist.extrapolation). Losses are deterministic
on one machine and thread count; the training seconds depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from journey_dist.data import load_tokens
from journey_dist.extrapolation import extrapolation_config, position_extrapolation, positions_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/positions")
    args = parser.parse_args()
    data = load_tokens("handbook", level="byte")
    base = extrapolation_config(data.vocab_size)
    t0 = time.perf_counter()
    rows = position_extrapolation(data, base)  # the lab's defaults: 150 steps of 16 x 32 tokens
    table = positions_table(rows)
    print(table)
    meta = {"command": "python benchmarks/positions.py", "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "threads": 1, "load_average": os.getloadavg(),  # position_extrapolation trains on one thread
            "seconds": time.perf_counter() - t0, "corpus": "handbook (bytes)", "config": base.to_dict()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = ["# Position encodings past the training length\n",
          f"Command: `{meta['command']}` (torch {meta['torch']}, {meta['threads']} threads, "
          f"load average {meta['load_average'][0]:.1f}, {meta['seconds']:.0f} s).\n",
          "One llama-mini at 2 layers x 64 channels per scheme, 150 steps of 16 x 32 bytes; validation "
          "loss (nats per byte) on 64-byte windows: positions 0..31 were seen in training, 32..63 never. "
          "Training seconds: wall (CPU time), on one thread.\n",
          "```", table, "```", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
