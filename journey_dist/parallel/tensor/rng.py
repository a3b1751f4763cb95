"""Dropout RNG under tensor parallel: which random stream each dropout must draw from.

    model_parallel_seed(seed, tp_rank)   # once per rank, before training (every tp rank: same seed)
    with fork("tp", x.device):           # per-rank regions: this rank's heads / sequence shard
        y = dropout(x)

The rule (Megatron-LM's CudaRNGStatesTracker; picotron, by contrast, seeds every rank alike and
keeps no per-rank stream):

* A region whose activations are **replicated** over the tp ranks (the residual dropout after
  the row-parallel all-reduce, the embedding dropout, both without sequence parallel) must draw
  the **same mask on every tp rank**, or the "replicated" activations diverge and the ranks train
  different models. It uses the default generator, seeded identically on every tp rank.
* A region holding **different data per rank** (attention-probability dropout on this rank's own
  heads; with sequence parallel the embedding and residual dropouts on this rank's sequence shard)
  must draw **independent masks per rank**, or head h on rank 0 and head h + H/t on rank 1 (or
  position s and s + S/t) share one mask. It runs inside `fork("tp")`: a second stream seeded
  with seed + 2718 + tp_rank, swapped into the device's default generator for the region, so the
  default stream is not advanced by it and stays in step across ranks.

Device-agnostic: one tracked state per device (CPU generator under gloo, each CUDA device's under
NCCL), created on first use from the seed, so the same code runs on either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TP_SEED_OFFSET = 2718  # Megatron's offset between the default and the model-parallel seed

__all__ = ["RNGStatesTracker", "ShardedDropout", "TP_SEED_OFFSET", "fork", "fork_if", "get_tracker",
           "model_parallel_seed"]


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator dropout on `device` draws from (torch's per-device default generator)."""
    if device.type == "cpu":
        return torch.default_generator
    module = getattr(torch, device.type, None)
    generators = getattr(module, "default_generators", None)
    if not generators:
        raise RuntimeError(f"no default generator for device type {device.type!r}")
    return generators[device.index]


class RNGStatesTracker:
    """Named random streams, each a seed plus one saved generator state per device."""

    def __init__(self) -> None:
        self.seeds: dict[str, int] = {}
        self.states: dict[tuple[str, str], torch.Tensor] = {}

    def reset(self) -> None:
        self.seeds.clear()
        self.states.clear()

    def add(self, name: str, seed: int) -> None:
        """Register stream `name`; its state on each device starts from `seed` at first use."""
        if seed in self.seeds.values() and self.seeds.get(name) != seed:
            raise ValueError(f"seed {seed} is already used by another stream: streams must differ")
        self.seeds[name] = seed
        for key in [k for k in self.states if k[0] == name]:
            del self.states[key]

    @contextlib.contextmanager
    def fork(self, name: str = "tp", device: torch.device | str = "cpu") -> Iterator[None]:
        """Run the block with stream `name` in place of `device`'s default generator state.

        On exit the stream's advanced state is saved and the default state restored, so the
        default stream continues exactly as if the block had drawn nothing.
        """
        if name not in self.seeds:
            raise RuntimeError(f"random stream {name!r} is not seeded: call "
                               "journey_dist.parallel.tensor.rng.model_parallel_seed(seed, tp_rank) "
                               "on every rank before running a tensor-parallel model with dropout")
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:  # "cuda" means the current device
            device = torch.device(device.type, getattr(torch, device.type).current_device())
        gen = _default_generator(device)
        key = (name, str(device))
        saved = gen.get_state()
        if key not in self.states:
            gen.manual_seed(self.seeds[name])
            self.states[key] = gen.get_state()
        gen.set_state(self.states[key])
        try:
            yield
        finally:
            self.states[key] = gen.get_state()
            gen.set_state(saved)


_TRACKER = RNGStatesTracker()


def get_tracker() -> RNGStatesTracker:
    """The process-wide tracker the tensor-parallel layers fork from."""
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: int) -> None:
    """Seed the default generators with `seed` (the same on every tp rank: replicated regions)
    and the "tp" stream with seed + 2718 + tp_rank (per-rank regions). Call on every rank, with
    the same `seed` across the tp group, before a forward with dropout."""
    torch.manual_seed(seed)  # CPU and every CUDA device
    _TRACKER.reset()
    _TRACKER.add("tp", seed + TP_SEED_OFFSET + tp_rank)


def fork(name: str = "tp", device: torch.device | str = "cpu"):
    """`get_tracker().fork(name, device)`: draw from stream `name` inside the block."""
    return _TRACKER.fork(name, device)


def fork_if(active: bool, name: str = "tp", device: torch.device | str = "cpu"):
    """`fork(name, device)` when `active` (a dropout that will draw), else a no-op context, so a
    model without dropout, or in eval mode, needs no seeded stream."""
    return _TRACKER.fork(name, device) if active else contextlib.nullcontext()


class ShardedDropout(torch.nn.Dropout):
    """Dropout on activations that differ per tp rank (a sequence shard): draws from the "tp"
    stream, so each rank's mask is independent and the default stream is left untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fork_if(self.training and self.p > 0, "tp", x.device):
            return super().forward(x)
