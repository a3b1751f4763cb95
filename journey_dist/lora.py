"""LoRA on GPT-mini: through PEFT, and from scratch to show there is nothing hidden in it.

A LoRA layer keeps the pretrained weight W frozen and learns a low-rank update:
    y = W x + b + (alpha / r) * B (A dropout(x)),   A: (r, in), B: (out, r), r << in, out
B starts at zero, so training starts exactly at the pretrained model. Only A and B get
gradients and optimizer state: for GPT-mini at r = 8 on all four linears of every block,
65,536 of 908,032 parameters. After training, W + (alpha / r) B A can be merged into W
(no extra cost at inference) and unmerged again.

    spec = LoRAConfig(rank=8, alpha=16, targets=LORA_LINEARS).validate(model.config)
    apply_peft_lora(model, spec)        # PEFT's inject_adapter_in_model (in place)
    apply_scratch_lora(model, spec)     # the same thing in ~30 lines (LoRALinear)
    merge_adapters(model); unmerge_adapters(model)
    save_lora(model, spec, "dir"); model, spec = load_lora("dir")

Both implementations name their parameters alike (base_layer, lora_A, lora_B; PEFT adds the
adapter name "default", which `adapter_state_dict` drops, as PEFT's own save does), so their
adapters, state dicts and files are interchangeable.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from journey_dist.config import GPTConfig, LoRAConfig
from journey_dist.data import TokenData
from journey_dist.memory.estimate import estimate_memory
from journey_dist.memory.measure import measure_step
from journey_dist.model import GPT
from journey_dist.parallel.data.replicas import make_data_parallel
from journey_dist.parity import RunResult, max_abs_diff, run_and_capture, unwrap
from journey_dist.report import bytes_table
from journey_dist.train import TrainConfig, make_optimizer

ADAPTER_FILE, BASE_FILE, CONFIG_FILE = "adapter.safetensors", "base.pt", "config.json"


# ---------------------------------------------------------------------- PEFT


def peft_config(spec: LoRAConfig):
    """The peft.LoraConfig for a LoRAConfig."""
    import peft  # deferred: peft (transformers behind it) takes seconds to import; only PEFT needs it

    return peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           target_modules=list(spec.targets), bias="none")


def apply_peft_lora(model: GPT, spec: LoRAConfig, seed: int = 0) -> GPT:
    """Wrap the targeted linears of `model` in PEFT LoRA layers, in place; freeze everything else.

    The spec is validated first (ConfigError listing the valid names). A's random init is drawn
    from `seed` without touching the caller's RNG, so every rank starts from the same adapters.
    """
    import peft  # deferred, as in peft_config

    spec.validate(model.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.inject_adapter_in_model(peft_config(spec), model)


# ---------------------------------------------------------------------- from scratch


class LoRALinear(nn.Module):
    """nn.Linear plus a trainable low-rank update; the frozen layer is `base_layer`.

    forward: base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, PEFT's order of operations,
    so outputs and gradients match PEFT's bit for bit for the same A and B.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT (and nn.Linear)
        nn.init.zeros_(self.lora_B.weight)  # the update starts at exactly zero

    def delta_weight(self) -> torch.Tensor:
        """The dense update (out, in) that merging adds to W: scaling * B @ A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight()
            self.merged = False


def apply_scratch_lora(model: GPT, spec: LoRAConfig, seed: int = 0) -> GPT:
    """Replace the targeted linears with LoRALinear, in place; freeze everything else."""
    spec.validate(model.config)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in spec.matched(model.config):
            parent_name, child = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), spec.rank, spec.alpha, spec.dropout))
    return model


# ---------------------------------------------------------------------- either implementation


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> LoRA layer (PEFT's or LoRALinear) in model order."""
    return {n: m for n, m in unwrap(model).named_modules()
            if isinstance(m, LoRALinear) or (hasattr(m, "lora_A") and hasattr(m, "merge"))}


def merge_adapters(model: nn.Module) -> None:
    """W <- W + scaling * B @ A in every LoRA layer; forward then skips the adapter path."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """W <- W - scaling * B @ A (W comes back up to float rounding, ~1e-9 here)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for layer in lora_layers(model).values())


def _canonical(name: str) -> str:
    return name.replace(".default", "")  # PEFT's adapter name, dropped as its own save does


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters by canonical name (transformer.h.0.attn.c_attn.lora_A.weight, ...)."""
    return {_canonical(n): p for n, p in unwrap(model).named_parameters() if ".lora_" in n}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the adapters (the same keys as peft.get_peft_model_state_dict)."""
    return {n: p.detach().clone() for n, p in adapter_params(model).items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapters into the model; every key must match exactly, in name and shape."""
    own = adapter_params(model)
    if own.keys() != state.keys():
        raise KeyError(f"adapter mismatch: missing {sorted(own.keys() - state.keys())[:4]}, "
                       f"unexpected {sorted(state.keys() - own.keys())[:4]}; apply LoRA with the "
                       "targets the adapters were saved with (config.json beside them, see save_lora) first")
    for name, p in own.items():
        if p.shape != state[name].shape:
            raise ValueError(f"{name}: file has shape {tuple(state[name].shape)}, model {tuple(p.shape)}; "
                             "load adapters into the preset and LoRA rank they were saved with")
        p.copy_(state[name])


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base model's state dict in plain GPT names (loads into GPT(config))."""
    if is_merged(model):
        raise RuntimeError("adapters are merged into the base weights; unmerge_adapters() first")
    return {k.replace(".base_layer.", "."): v for k, v in unwrap(model).state_dict().items()
            if ".lora_" not in k}


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, a tied weight counted once."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (AdamW: two moments and a step per parameter)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------------- files


def save_lora(model: nn.Module, spec: LoRAConfig, directory: str | Path) -> dict[str, Path]:
    """Write config.json (GPT + LoRA), base.pt (the base weights: trained here, so not on a hub)
    and adapter.safetensors (A and B only; the file a user would share)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    gpt = unwrap(model)
    paths = {"config": d / CONFIG_FILE, "base": d / BASE_FILE, "adapter": d / ADAPTER_FILE}
    meta = {"gpt": gpt.config.to_dict(), "lora": asdict(spec)}
    paths["config"].write_text(json.dumps(meta, indent=2) + "\n")
    moved: dict[int, torch.Tensor] = {}  # by storage: tied wte/lm_head stay one tensor in the file
    torch.save({k: moved.setdefault(v.untyped_storage().data_ptr(), v.detach().cpu())
                for k, v in base_state_dict(gpt).items()}, paths["base"])
    save_file({k: v.cpu().contiguous() for k, v in adapter_state_dict(gpt).items()}, str(paths["adapter"]),
              metadata={"lora": json.dumps(asdict(spec))})
    return paths


def load_lora(directory: str | Path, impl: str = "peft") -> tuple[GPT, LoRAConfig]:
    """Rebuild a LoRA GPT from save_lora's files (impl "peft" or "scratch"); loads tensors only
    (torch.load(weights_only=True), safetensors), never pickled code."""
    d = Path(directory)
    meta = json.loads((d / CONFIG_FILE).read_text())
    spec = LoRAConfig(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"])})
    model = GPT(GPTConfig(**meta["gpt"]))
    model.load_state_dict(torch.load(d / BASE_FILE, map_location="cpu", weights_only=True))
    apply = {"peft": apply_peft_lora, "scratch": apply_scratch_lora}[impl]
    apply(model, spec)
    load_adapter_state_dict(model, load_file(str(d / ADAPTER_FILE)))
    return model, spec


# ---------------------------------------------------------------------- training, one or many ranks


def finetune(model: GPT, data: TokenData, cfg: TrainConfig, *, group: dist.ProcessGroup | None = None,
             ddp: bool | None = None, **train_kwargs) -> RunResult:
    """Train the model's trainable (LoRA) parameters with the shared loop.

    With more than one rank (or ddp=True) the model is wrapped in DistributedDataParallel: it
    buckets only parameters that require grad, so each step all-reduces the adapters' gradients
    and nothing of the frozen base. Each rank takes its shard of the same global batch.
    Communication per step: forward none; backward all-reduce(SUM)/N of the adapter gradients.
    """
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if not (world > 1 if ddp is None else ddp):
        return run_and_capture(model, data, cfg, **train_kwargs)
    dp = make_data_parallel("ddp", model, group=group)
    return run_and_capture(dp.module, data, cfg, dp.hooks(), optimizer=make_optimizer(model, cfg),
                           block_size=model.config.block_size, **train_kwargs)


@torch.no_grad()
def max_diff_from_rank0(tensors: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None) -> float:
    """Largest |this rank's tensor - rank 0's| over all ranks (0.0: replicas are identical).

    Communication: broadcast of the flattened tensors from the group's first rank, then an
    all-reduce(MAX) of one scalar. No backward.
    """
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors.values()])
    ref = flat.clone()
    dist.broadcast(ref, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=group)
    return diff.item()


def ddp_vs_one_process(base: GPT, spec: LoRAConfig, data: TokenData, cfg: TrainConfig) -> float:
    """Max |adapter difference| between fresh adapters on `base` trained under DDP (each rank its
    shard of the batch; `finetune`'s all-reduce of adapter gradients) and trained in this process
    alone on the whole batch: float rounding when data parallel LoRA is right."""
    ddp_run = finetune(apply_peft_lora(copy.deepcopy(base), spec), data, cfg)
    one = finetune(apply_peft_lora(copy.deepcopy(base), spec), data, cfg, ddp=False)
    adapters = {k: v for k, v in ddp_run.params.items() if ".lora_" in k}
    return max_abs_diff(adapters, {k: one.params[k] for k in adapters})


# ---------------------------------------------------------------------- what lab 08 measures


def step_memory(base: GPT, spec: LoRAConfig, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, *,
                batch_size: int, dp: int = 1) -> dict[str, dict]:
    """One training step of full fine-tuning and of LoRA, each on a copy of `base`: measured by the
    exact tensor ledger (on CUDA too) next to memory.estimate_memory for the global `batch_size`
    on `dp` ranks. {"full fine-tuning" | "LoRA": {measured, estimated, grads_*, optimizer_*,
    peak_*}}, each * "measured" and "estimated" bytes."""
    memory = {}
    for name, model, lora in (("full fine-tuning", copy.deepcopy(base), None),
                              ("LoRA", apply_peft_lora(copy.deepcopy(base), spec), spec)):
        meas = measure_step(model, make_optimizer(model, cfg), x, y, ledger=True)
        est = estimate_memory(base.config, batch_size=batch_size, seq_len=base.config.block_size, dp=dp,
                              device=x.device.type, lora=lora)  # lora: adapters in, frozen-base savings out
        memory[name] = {"measured": meas.to_dict(), "estimated": est.to_dict(),
                        "optimizer_measured": meas.high_water["optimizer"],
                        "optimizer_estimated": est.optimizer,
                        "grads_measured": meas.high_water["grads"], "grads_estimated": est.grads,
                        "peak_measured": meas.peak, "peak_estimated": est.total}
    return memory


def save_and_reload(model: nn.Module, spec: LoRAConfig, directory: str | Path, x: torch.Tensor) -> dict:
    """save_lora, then load_lora from those files: {config, base, adapter: bytes of each file,
    round_trip_diff: max |logit difference| on `x` between the reloaded model and `model`}."""
    files = {k: p.stat().st_size for k, p in save_lora(model, spec, directory).items()}
    loaded = load_lora(directory)[0].to(x.device)
    with torch.no_grad():
        files["round_trip_diff"] = (loaded.eval()(x)[0] - model.eval()(x)[0]).abs().max().item()
    return files


@torch.no_grad()
def merge_parity(model: nn.Module, base: GPT, spec: LoRAConfig, x: torch.Tensor) -> dict[str, float]:
    """Max |logit difference| on `x`: a merged copy of `model` (W + (alpha/r) B A) vs `model`, the
    copy unmerged again vs `model` (rounding of W + BA - BA), and the from-scratch LoRALinear on
    `base` given `model`'s A and B vs PEFT, unmerged and merged. `model` itself is left as it is."""
    unmerged = model.eval()(x)[0]
    merged_model = copy.deepcopy(model)
    merge_adapters(merged_model)
    merged = merged_model(x)[0]
    unmerge_adapters(merged_model)
    again = merged_model(x)[0]
    scratch = apply_scratch_lora(copy.deepcopy(base).eval(), spec)
    load_adapter_state_dict(scratch, adapter_state_dict(model))
    scratch_out = scratch(x)[0]
    merge_adapters(scratch)
    scratch_merged = scratch(x)[0]
    return {"merge_diff": (merged - unmerged).abs().max().item(),
            "unmerge_diff": (again - unmerged).abs().max().item(),
            "scratch_vs_peft_diff": (scratch_out - unmerged).abs().max().item(),
            "scratch_vs_peft_merged_diff": (scratch_merged - merged).abs().max().item()}


def describe(model: nn.Module, spec: LoRAConfig) -> str:
    """The adapters in three parts: rank, alpha and targets; trainable vs total parameters; the
    first adapted linear as PEFT (or LoRALinear) wrapped it."""
    trainable, total = param_counts(model)
    first = next(iter(lora_layers(model).values()))
    return (f"LoRA r={spec.rank}, alpha={spec.alpha:g} (scaling {spec.scaling:g}) on "
            f"{len(spec.matched(unwrap(model).config))} linears: {', '.join(spec.targets)}\n"
            f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%); the base has "
            f"{total - trainable:,}\n{first}")


def memory_table(memory: dict[str, dict]) -> str:
    """step_memory's rows as measured / estimated MiB: gradients, optimizer state, peak."""
    parts = ("grads", "optimizer", "peak")
    return bytes_table({name: {k: (r[f"{k}_measured"], r[f"{k}_estimated"]) for k in parts}
                        for name, r in memory.items()})
