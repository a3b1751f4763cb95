"""Position encodings past the training length, measured: train one small model per scheme at
`train_len` tokens, then read its loss at that length and on the positions it never saw.

    rows = position_extrapolation(data, extrapolation_config(data.vocab_size))

The model is llama-mini's (RMSNorm, SwiGLU, 4 query heads on 2 kv heads) at 2 layers x 64
channels, trained 150 steps of 16 x 32 tokens: a few seconds per scheme on 2 CPU cores. Each
model starts from the same seed and sees the same batches; only `positions` differs. The
evaluation window is `factor` x train_len tokens: the loss on its first train_len positions is
the in-distribution number, the loss on the rest is the extrapolation (learned positions meet
rows that were never trained, RoPE meets unseen distances, ALiBi only a longer linear penalty).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from journey_dist.config import POSITIONS, GPTConfig, get_preset
from journey_dist.data import TokenData, get_batch
from journey_dist.model import GPT
from journey_dist.runtime import seed_everything
from journey_dist.train import TrainConfig, train

EVAL_SEED = 4242  # validation batches, the same for every scheme


def extrapolation_config(vocab_size: int = 256) -> GPTConfig:
    """llama-mini's switches at 2 layers x 64 channels (positions and block_size set per run)."""
    return get_preset("llama-mini", vocab_size=vocab_size, n_layer=2, n_embd=64, mlp_hidden=None)


@torch.no_grad()
def loss_by_position(model: GPT, tokens: torch.Tensor, batch_size: int, length: int, batches: int,
                     seed: int = EVAL_SEED) -> torch.Tensor:
    """(length,) mean next-token loss at each position of `length`-token windows of `tokens`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(length)
    for i in range(batches):
        x, y = get_batch(tokens, batch_size, length, step=i, seed=seed)
        logits, _ = model(x.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
        total += loss.view(batch_size, length).mean(0).cpu()
    model.train(was_training)
    return total / batches


def position_extrapolation(data: TokenData, base: GPTConfig, *, schemes: Sequence[str] = POSITIONS,
                           train_len: int = 32, factor: int = 2, steps: int = 150, batch_size: int = 16,
                           lr: float = 3e-3, eval_batches: int = 8, seed: int = 0,
                           device: torch.device | str = "cpu") -> list[dict]:
    """One row per scheme: loss at train_len, and on positions [0, train_len) and
    [train_len, factor x train_len) of a factor x train_len window, with the training time."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":  # 64-channel matmuls: a second thread costs more than it
        torch.set_num_threads(1)  # saves (3 s per scheme alone; 13-42 s with 2 threads on a busy CPU)
    try:
        return [_one_scheme(data, base, scheme, train_len, factor, steps, batch_size, lr, eval_batches, seed,
                            device) for scheme in schemes]
    finally:
        torch.set_num_threads(threads)


def _one_scheme(data: TokenData, base: GPTConfig, scheme: str, train_len: int, factor: int, steps: int,
                batch_size: int, lr: float, eval_batches: int, seed: int, device: torch.device | str) -> dict:
    long = factor * train_len
    seed_everything(seed)
    model = GPT(base.with_(positions=scheme, block_size=long)).to(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(20, steps // 10),
                       log_every=steps, seed=seed)
    history = train(model, data, tcfg, block_size=train_len, verbose=False)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    short = loss_by_position(model, data.val, batch_size, train_len, eval_batches)
    window = loss_by_position(model, data.val, batch_size, long, eval_batches)
    return {
        "positions": scheme, "params": model.num_params(), "train_len": train_len, "eval_len": long,
        "steps": steps, "train_loss": history.last_loss, "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,  # one thread: wall time above it is waiting for a core
        "loss_at_train_len": short.mean().item(),
        "loss_seen_positions": window[:train_len].mean().item(),
        "loss_unseen_positions": window[train_len:].mean().item(),
    }


def positions_table(rows: list[dict]) -> str:
    """The lab's table: one line per scheme, losses at and past the training length."""
    t = rows[0]["train_len"]
    head = (f"{'positions':<11} {'params':>8} {'loss @ ' + str(t):>10} {'pos < ' + str(t):>9} "
            f"{'pos >= ' + str(t):>9}  change  train s (cpu)")
    lines = [head]
    for r in rows:
        change = r["loss_unseen_positions"] - r["loss_seen_positions"]
        lines.append(f"{r['positions']:<11} {r['params']:>8,} {r['loss_at_train_len']:>10.3f} "
                     f"{r['loss_seen_positions']:>9.3f} {r['loss_unseen_positions']:>9.3f}  {change:+.3f}  "
                     f"{r['train_seconds']:>7.1f} ({r['train_cpu_seconds']:.1f})")
    return "\n".join(lines)
