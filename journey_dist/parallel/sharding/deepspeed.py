"""GPT-mini under DeepSpeed ZeRO stages 1, 2 and 3: config builders and a measured run.

    cfg = deepspeed_config(stage=2, micro_batch=4, grad_accum=1)   # fp32 (CPU) or dtype="bf16" (GPU)
    run = run_deepspeed(2, get_preset("gpt-mini"), data, TrainConfig(...))

What each stage shards over the N data-parallel ranks (Rajbhandari et al. 2020):
    stage 1  optimizer state (fp32 master partition + AdamW moments)
    stage 2  + gradients: each rank keeps only its partition of the reduced gradient
             (DeepSpeed 0.19 all-reduces each gradient bucket, use_multi_rank_bucket_allreduce,
             and keeps its slice; its stage 1 takes the same path, so it partitions them too)
    stage 3  + parameters: each rank keeps a partition; a module's weights are all-gathered
             before its forward and again before its backward, then freed. The tied wte is
             used by two modules (embedding, head), so it is gathered twice each way.

Equal to DDP: DeepSpeed averages gradients over the dp ranks (postscale_gradients with
gradient_predivide_factor 1: sum, then x 1/N), scales the loss by 1/gradient_accumulation_steps
in engine.backward, uses no loss scaling in fp32 or bf16, and clips by the global norm
(`gradient_clipping`). The optimizer is the client torch.optim.AdamW from train.make_optimizer
(same groups as every other lab; it also avoids building DeepSpeed's CPU Adam extension).

CPU notes (DeepSpeed 0.19): DS_ACCELERATOR=cpu must be set before `import deepspeed`; the
shared-memory comm extension is switched off so no C++ build runs; at exit the engine must be
deleted and the ranks must meet at a barrier before the process group is destroyed.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.comm import ledger_by_op
from journey_dist.config import ConfigError, GPTConfig
from journey_dist.data import TokenData
from journey_dist.parallel.common import mean_over
from journey_dist.parity import RunResult, fresh_model, measure_one_step, run_and_capture, storage_bytes
from journey_dist.train import Batch, StepHooks, StepResult, TrainConfig, make_optimizer

STAGES = (1, 2, 3)
INSTALL = 'pip install -e ".[deepspeed]"'  # DeepSpeed is an optional extra (pyproject.toml)


def installed() -> bool:
    """Whether `import deepspeed` can find the package (without importing it: that takes seconds)."""
    return importlib.util.find_spec("deepspeed") is not None


def choose_stages(stages: list[int] | None, ds_config: str | None, skip: bool,
                  available: bool | None = None) -> tuple[list[int], str]:
    """The DeepSpeed ZeRO stages a run asked for (--stages, --ds-config, --skip-deepspeed), and a
    note when they are left out because DeepSpeed is not installed.

    No request means every stage if DeepSpeed is installed, else none (with the note naming the
    install command); an explicit request DeepSpeed cannot serve, or that contradicts --skip-deepspeed,
    is a ConfigError.
    """
    if skip and (stages or ds_config):
        raise ConfigError("--skip-deepspeed leaves out the DeepSpeed stages that --stages/--ds-config "
                          "choose; pass one or the other")
    if skip:
        return [], ""
    if stages and set(stages) - set(STAGES):
        raise ConfigError(f"--stages {','.join(map(str, stages))}: ZeRO stages are 1, 2, 3; use e.g. "
                          "--stages 1,2,3 (or --skip-deepspeed)")
    if installed() if available is None else available:
        return list(stages or STAGES), ""
    if stages or ds_config:
        raise ConfigError(f"DeepSpeed is not installed, so --stages/--ds-config cannot run; install it with "
                          f"{INSTALL}, or pass --skip-deepspeed")
    return [], f"DeepSpeed is not installed, so its ZeRO stages are left out; add them with {INSTALL}"


def deepspeed_config(stage: int, *, micro_batch: int = 4, grad_accum: int = 1, grad_clip: float = 1.0,
                     dtype: str = "fp32", bucket_elements: int = 50_000_000) -> dict:
    """A DeepSpeed config for ZeRO `stage` with a client optimizer.

    dtype "fp32" (CPU; no loss scaling) or "bf16" (GPU: bf16 weights and grads, fp32 master
    and moments in the optimizer). Stage 3 partitions every parameter (persistence threshold
    0), so even GPT-mini's small tensors are sharded and the bytes match the formula, and frees
    gathered weights after use (max reuse distance 0): the textbook ZeRO-3, re-gathering in backward.
    """
    if stage not in STAGES:
        raise ConfigError(f"ZeRO stage {stage!r} is not one of 1, 2, 3")
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype={dtype!r}; use 'fp32' (CPU) or 'bf16' (GPU)")
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                  "reduce_bucket_size": bucket_elements, "allgather_bucket_size": bucket_elements}
    if stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                     "stage3_max_reuse_distance": 0,
                     "stage3_max_live_parameters": bucket_elements,
                     "stage3_gather_16bit_weights_on_model_save": True})
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def write_launch_configs(directory: str | Path, *, micro_batch: int = 4, dtype: str = "bf16") -> list[Path]:
    """Write zero1.json, zero2.json, zero3.json (GPU defaults) for the `deepspeed` launcher."""
    paths = []
    for stage in STAGES:
        path = Path(directory) / f"zero{stage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = deepspeed_config(stage, micro_batch=micro_batch, dtype=dtype)
        path.write_text(json.dumps(ds, indent=2) + "\n")
        paths.append(path)
    return paths


def load_config(path: str | Path, cfg: TrainConfig, dp: int) -> dict:
    """A DeepSpeed JSON from disk with the batch fields set from `cfg` (the lab owns the batch)."""
    if not Path(path).is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} not found; pass one of "
                          "launch/deepspeed/zero1.json, zero2.json, zero3.json or your own JSON")
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix it or start from "
                          "launch/deepspeed/zero2.json") from None
    if ds.get("zero_optimization", {}).get("stage") not in STAGES:
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3; set "
                          '"zero_optimization": {"stage": 2} (see launch/deepspeed/zero2.json)')
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size // (dp * cfg.grad_accum)
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["gradient_clipping"] = cfg.grad_clip
    return ds


def import_deepspeed(device: torch.device):
    """Import deepspeed for this device: the CPU accelerator and no JIT-built shm comm on CPU."""
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read once, at import
    os.environ.setdefault("DS_BUILD_OPS", "0")
    # deferred: an optional extra, and DS_ACCELERATOR must be set before the import reads it
    import deepspeed
    import deepspeed.ops

    ops = vars(deepspeed.ops)
    if "__compatible_ops__" in ops:  # already probed: switch the extension off in place
        ops["__compatible_ops__"]["deepspeed_shm_comm"] = False
    else:  # not probed yet: never probe (probing runs compilers); comm/torch.py reads only this key
        ops["__compatible_ops__"] = {"deepspeed_shm_comm": False}
    return deepspeed


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    return engine.optimizer.optimizer  # DeepSpeed's ZeRO wrapper around the client AdamW


def state_bytes(engine, stage: int, model: nn.Module) -> dict[str, int]:
    """This rank's persistent tensors after a step: weights (stage 3: the partition, ds_tensor),
    AdamW moments, and DeepSpeed's fp32 master partition (a copy even in fp32 training)."""
    opt = engine.optimizer
    inner = _inner_optimizer(engine)
    if stage == 3:
        params = storage_bytes(p.ds_tensor for p in model.parameters())
        master = storage_bytes(opt.fp32_partitioned_groups_flat)
    else:
        params = storage_bytes(model.parameters())
        master = storage_bytes(opt.single_partition_of_fp32_groups)
    moments = [v for s in inner.state.values() for k, v in s.items() if k != "step"]
    return {"params": params, "optimizer": storage_bytes(moments), "master": master}


def grad_bytes(engine, model: nn.Module) -> dict[str, int]:
    """Gradient bytes alive after the boundary backward, before the step: full-size .grad still on
    the model ("full") and DeepSpeed's reduced partitions and flat gradient buffers ("partition")."""
    opt = engine.optimizer
    full = [p.grad for p in model.parameters() if p.grad is not None and p.grad.numel() > 0]
    parts = [t for ts in getattr(opt, "averaged_gradients", {}).values() if ts for t in ts]
    for name in ("grads_in_partition", "grad_partitions_flat_buffer"):
        if isinstance(getattr(opt, name, None), torch.Tensor):
            parts.append(getattr(opt, name))
    return {"full": storage_bytes(full), "partition": storage_bytes(parts),
            "total": storage_bytes(full + parts)}


def _gathered(model: nn.Module, stage: int, deepspeed) -> dict[str, torch.Tensor]:
    """Full parameters by name (stage 3 gathers them: an all-gather per partition)."""
    named = dict(model.named_parameters())
    if stage != 3:
        return {k: v.detach().float().clone() for k, v in named.items()}
    with deepspeed.zero.GatheredParameters(list(named.values())):
        return {k: v.detach().float().clone() for k, v in named.items()}


def engine_hooks(engine, on_boundary: Callable[[object], None] | None = None) -> StepHooks:
    """DeepSpeed joins the shared loop through its own step: the engine runs forward, backward (it
    scales the loss by 1/gradient_accumulation_steps and reduces gradients as its stage says) and
    steps the optimizer at the accumulation boundary, clipping by `gradient_clipping`. The logged
    loss is averaged over the data-parallel ranks; `on_boundary(engine)` runs after the last backward."""
    def step(_model, _optimizer, micro: list[Batch], _hooks: StepHooks, *, grad_clip: float = 0.0,
             autocast: str | None = None, scaler: torch.amp.GradScaler | None = None) -> StepResult:
        if scaler is not None or autocast is not None:
            raise ConfigError("DeepSpeed sets its own precision and loss scaling from its config "
                              "(\"bf16\"/\"fp16\" sections); leave TrainConfig.autocast None")
        total = torch.zeros((), device=engine.device)
        for x, y in micro:
            loss = engine(x, y)[1]
            engine.backward(loss)
            if on_boundary is not None and engine.is_gradient_accumulation_boundary():
                on_boundary(engine)
            engine.step()  # steps the optimizer only at the accumulation boundary
            total += loss.detach().float() / len(micro)
        norm = engine.get_global_grad_norm()  # the norm it clipped by (None before any step)
        return StepResult(total, None if norm is None else torch.tensor(float(norm)))

    return StepHooks(step_fn=step, reduce_loss=mean_over(), dp_rank=dist.get_rank(),
                     dp_size=dist.get_world_size())


def run_deepspeed(stage: int, config: GPTConfig, data: TokenData, cfg: TrainConfig, *, seed: int = 0,
                  device: torch.device | None = None, ds_config: dict | None = None,
                  dtype: str = "fp32") -> RunResult:
    """Train a fresh GPT (weights from `seed`) under DeepSpeed ZeRO `stage` with the shared loop (its
    lr schedule, this rank's shard of every global batch), then one more step under a CommLedger.
    The first step's global gradient norm is kept (grad_norm): DeepSpeed holds only partitions."""
    device = device or torch.device("cpu")
    deepspeed = import_deepspeed(device)
    micro = cfg.batch_size // (dist.get_world_size() * cfg.grad_accum)
    ds = ds_config or deepspeed_config(stage, micro_batch=micro, grad_accum=cfg.grad_accum,
                                       grad_clip=cfg.grad_clip, dtype=dtype)
    model = fresh_model(config, seed, device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg), config=ds,
                                      dist_init_required=False)
    grads: dict[str, int] = {}
    measuring = False

    def record_grads(boundary_engine) -> None:  # after the boundary backward, before the step frees them
        if measuring:
            grads.update(grad_bytes(boundary_engine, model))

    hooks = engine_hooks(engine, record_grads)
    run = run_and_capture(engine, data, cfg, hooks, name=f"deepspeed zero-{stage}", first_grads=False,
                          optimizer=engine.optimizer, block_size=config.block_size)
    run.params = _gathered(model, stage, deepspeed)
    measuring = True
    run.comm = ledger_by_op(measure_one_step(engine, engine.optimizer, data, cfg, hooks,
                                             block_size=config.block_size))
    run.state_bytes = {**state_bytes(engine, stage, model), "grads": grads["total"],
                       "grads_full": grads["full"], "grads_partition": grads["partition"]}
    engine.destroy()  # DeepSpeed's hooks and buffers go now, not at interpreter exit
    del hooks, engine  # the hooks' step holds the engine too
    gc.collect()
    dist.barrier()  # every rank done with DeepSpeed before the group goes away
    return run
