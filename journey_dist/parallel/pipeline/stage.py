"""Pipeline stages: the one layer split, and a GPT cut into the stage this rank holds.

`stage_layers` is the only rule for which layers a stage holds: the built stages (`GPTStage`), the
memory estimator (memory/sizes.py) and `journey plan` all call it, so a plan's per-stage rows are
the stages a run builds. With v virtual stages per rank (the interleaved schedule) the same rule
cuts p·v chunks and rank r holds chunks r, r + p, ..., r + (v-1)p (`rank_layers`).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from journey_dist.config import GPTConfig, ParallelConfig
from journey_dist.model import GPT, add_positions
from journey_dist.runtime import comm_device


def stage_layers(n_layer: int, pp: int, virtual: int = 1) -> list[range]:
    """Contiguous, balanced layer ranges per stage (per virtual stage: pp·virtual of them).

    The first stage also embeds and the last also runs the head and loss, so leftover layers
    (n_layer % pp) go to the middle stages first. Virtual stages must divide n_layer evenly
    (a ConfigError otherwise), as Megatron-LM requires for its interleaved schedule.
    """
    schedule = "interleaved" if virtual > 1 else "gpipe"
    ParallelConfig(pp=pp, schedule=schedule, virtual_stages=virtual, microbatches=pp).validate(
        GPTConfig(n_layer=n_layer, n_head=1, n_embd=8))
    pp *= virtual
    counts = [n_layer // pp] * pp
    order = list(range(1, pp - 1)) + [0, pp - 1] if pp > 2 else list(range(pp))
    for s in order[: n_layer % pp]:
        counts[s] += 1
    starts = [sum(counts[:s]) for s in range(pp)]
    return [range(a, a + c) for a, c in zip(starts, counts)]


def rank_layers(n_layer: int, pp: int, rank: int, virtual: int = 1) -> list[range]:
    """The layer ranges rank `rank` holds, one per chunk: virtual stages rank, rank + pp, ..."""
    split = stage_layers(n_layer, pp, virtual)
    return [split[rank + c * pp] for c in range(virtual)]


class GPTStage(nn.Module):
    """Stage `stage_index` of a GPT split `num_stages` ways, made from a plain GPT's modules.

    Names match the full model's (transformer.h.<global layer>...), so a stage's state dict is a
    slice of GPT's. With tied embeddings and p > 1 the last stage keeps its own copy of wte as
    lm_head.weight (as Megatron does); `Pipeline` adds the two copies' gradients after the flush,
    so both stay equal to the single tied matrix. With `virtual` > 1 the stage holds that many
    chunks of layers (`chunks`), run one at a time by forward(x, chunk); the first chunk of stage
    0 embeds, the last chunk of the last stage runs the head.
    """

    def __init__(self, model: GPT, stage_index: int, num_stages: int, virtual: int = 1):
        super().__init__()
        self.config, self.stage_index, self.num_stages = model.config, stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.chunks = rank_layers(model.config.n_layer, num_stages, stage_index, virtual)
        self.num_chunks = virtual
        self.layers = [i for chunk in self.chunks for i in chunk]
        t = model.transformer
        mods: dict[str, nn.Module] = {}
        if self.is_first:
            mods.update(wte=t.wte, **({"wpe": t.wpe} if "wpe" in t else {}), drop=t.drop)  # wpe: learned
        mods["h"] = nn.ModuleDict({str(i): t.h[i] for i in self.layers})
        if self.is_last:
            mods["ln_f"] = t.ln_f
        self.transformer = nn.ModuleDict(mods)
        self.tied = model.config.tie_embeddings and num_stages > 1 and (self.is_first or self.is_last)
        if self.is_last:
            self.lm_head = model.lm_head
            if self.tied and not self.is_first:  # the last stage's own copy of the (V, C) matrix
                self.lm_head = copy.deepcopy(model.lm_head)  # same module type (e.g. a TP wrapper)

    def forward(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """First stage (chunk 0): ids (B, T); others: (B, T, C). The last stage (its last chunk)
        returns logits (B, T, V)."""
        if self.is_first and chunk == 0:
            T = x.size(1)
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size="
                                 f"{self.config.block_size}; crop it to {self.config.block_size} tokens")
            pos, tr = torch.arange(T, device=x.device), self.transformer
            x = tr.drop(add_positions(tr.wte(x), pos, self.config, tr))  # (B, T, C)
        for i in self.chunks[chunk]:
            x = self.transformer.h[str(i)](x)
        if self.is_last and chunk == self.num_chunks - 1:
            return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return x

    def chunk_module(self, chunk: int) -> nn.Module:
        """Chunk `chunk` as a module of its own (its modules only, the same objects), for
        torch.distributed.pipelining, which wants one module per virtual stage."""
        return _Chunk(self, chunk)

    def boundary_shape(self, micro_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """Activations passed between stages for a (B, T) microbatch of ids: (B, T, C)."""
        return (micro_shape[0], micro_shape[1], self.config.n_embd)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy, as GPT.forward computes it (targets == -1 ignored)."""
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of the tied embedding matrix when the tie spans stages, else None."""
        if not self.tied:
            return None
        return self.transformer.wte.weight if self.is_first else self.lm_head.weight

    def unique_parameters(self) -> list[nn.Parameter]:
        """Parameters counted once across the pipeline (the last stage's wte copy left out)."""
        skip = self.lm_head.weight if self.tied and self.is_last else None
        return [p for p in self.parameters() if p is not skip]


class _Chunk(nn.Module):
    """One chunk of a GPTStage: registers that chunk's modules (the embedding with chunk 0 of the
    first stage, ln_f and the head with the last chunk of the last stage), runs stage(x, chunk)."""

    def __init__(self, stage: GPTStage, chunk: int):
        super().__init__()
        self.run = functools.partial(stage.forward, chunk=chunk)  # a partial: the stage is not registered
        t, mods = stage.transformer, {}
        if stage.is_first and chunk == 0:  # the embedding's modules: everything but the blocks and ln_f
            mods.update({name: m for name, m in t.items() if name not in ("h", "ln_f")})
        mods["h"] = nn.ModuleDict({str(i): t.h[str(i)] for i in stage.chunks[chunk]})
        if stage.is_last and chunk == stage.num_chunks - 1:
            mods["ln_f"], self.lm_head = t.ln_f, stage.lm_head
        self.transformer = nn.ModuleDict(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def build_stage(model: GPT, group: dist.ProcessGroup | None = None, virtual: int = 1) -> GPTStage:
    """This rank's stage of `model` (with `virtual` chunks) on the backend's device; index and
    count from the pp group."""
    return GPTStage(model, dist.get_rank(group), dist.get_world_size(group), virtual).to(comm_device(group))


def stage_summary(stage: GPTStage) -> dict:
    """What one built stage holds: its layers, the ends of the model it also runs, its parameters
    (counted from the module, the last stage's copy of a tied wte included)."""
    also = (["embedding"] if stage.is_first else []) + (["ln_f, head, loss"] if stage.is_last else [])
    if stage.tied and stage.is_last and not stage.is_first:
        also.append("its own copy of wte (the tied head)")
    return {"stage": stage.stage_index, "layers": ", ".join(f"{r.start}..{r.stop - 1}" for r in stage.chunks),
            "also": ", ".join(also) or "-", "parameters": sum(p.numel() for p in stage.parameters())}
