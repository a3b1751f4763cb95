"""Lab 08: LoRA fine-tuning through PEFT -- teach a pretrained GPT-mini a new kind of text by
training 7% of its parameters, then merge the adapters into the weights.

    python labs/08_lora_finetune.py                          # one process, about a minute on a 2-core CPU
    torchrun --nproc_per_node=2 labs/08_lora_finetune.py     # LoRA + DDP: only adapter grads are all-reduced
    python labs/08_lora_finetune.py --rank 4 --targets attn.c_attn,mlp.c_fc

GPT-mini is pretrained on the "handbook" corpus (or lab 01's checkpoint is loaded if it exists),
then fine-tuned on "dialogues" (STUDENT/MENTOR exchanges) with LoRA adapters on every block's
linears. What to look at: trainable vs total parameters; the dialogues loss falling while the
base weights stay bitwise unchanged; gradients and AdamW state only for the adapters (measured
next to the estimate, full fine-tuning vs LoRA; activations barely shrink, since backward still
runs through every frozen layer); the adapter file is a few hundred KiB next to a multi-MiB base;
one table of checks: merged and unmerged models agree to float rounding (~1e-6), PEFT and the
from-scratch LoRALinear agree exactly, the reloaded files give the same logits, and under 2 ranks
the adapters stay identical on every rank and equal to one process's on the full batch.
Results: runs/08_lora_finetune/{result.json, adapter/}.
"""

# %% Setup: arguments, model and LoRA config, every check that can fail, before any process starts
import copy
from dataclasses import asdict

import torch
import torch.distributed as dist

from journey_dist.config import PRESETS, ConfigError, LoRAConfig, ParallelConfig, block_linears, get_preset
from journey_dist.data import get_batch, load_tokens
from journey_dist.labkit import (
    check_data,
    check_memory,
    existing_file,
    lab_parser,
    note,
    parse,
    positive_float,
    positive_int,
    probability,
)
from journey_dist.lora import (
    adapter_state_dict,
    apply_peft_lora,
    base_state_dict,
    ddp_vs_one_process,
    describe,
    finetune,
    max_diff_from_rank0,
    memory_table,
    merge_parity,
    param_counts,
    save_and_reload,
    step_memory,
)
from journey_dist.memory.estimate import fmt_bytes
from journey_dist.model import GPT
from journey_dist.parity import fresh_model
from journey_dist.report import checks_table
from journey_dist.runtime import (
    comm_device,
    is_rank0,
    launch,
    print0,
    requested_world_size,
    runs_dir,
    save_json,
)
from journey_dist.train import TrainConfig, evaluate

LAB = "08_lora_finetune"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--ranks", type=positive_int, default=1, help="ranks to spawn under plain python")
parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
parser.add_argument("--alpha", type=positive_float, default=16.0,
                    help="LoRA alpha (update scaled by alpha/r)")
parser.add_argument("--lora-dropout", type=probability, default=0.0)
parser.add_argument("--targets", default=None, help="comma-separated module names (default: every linear "
                    "of a block, by family: c_attn,c_proj,c_fc | q/k/v/o_proj,gate/up/down_proj)")
parser.add_argument("--pretrain-steps", type=positive_int, default=150,
                    help="on handbook, if no base checkpoint is used")
parser.add_argument("--steps", type=positive_int, default=100, help="LoRA fine-tuning steps on dialogues")
parser.add_argument("--batch-size", type=positive_int, default=16, help="global batch (sequences)")
parser.add_argument("--lr", type=positive_float, default=3e-3)
parser.add_argument("--base", default=None, help="pretrained checkpoint to start from (default: lab 01's "
                    "runs/01_single_device/model.pt if it exists and matches --preset, else pretrain here)")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

world = requested_world_size(args.ranks)
config = get_preset(args.preset)
targets = args.targets or ",".join(block_linears(config))
spec = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout,
                  targets=tuple(t.strip() for t in targets.split(",") if t.strip())).validate(config)
ParallelConfig(dp=world).validate(config, world, args.batch_size)
handbook, dialogues = load_tokens("handbook"), load_tokens("dialogues")
for corpus in (handbook, dialogues):
    check_data(parser, corpus, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
pre_cfg = TrainConfig(steps=args.pretrain_steps, batch_size=args.batch_size, lr=3e-3,
                      warmup_steps=max(1, args.pretrain_steps // 10),
                      log_every=max(1, args.pretrain_steps // 5))
ft_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     warmup_steps=max(1, args.steps // 10), log_every=max(1, args.steps // 5))


def base_mismatch(saved: dict) -> str:
    """'' when a checkpoint holds --preset's model, else what it holds instead."""
    if saved.get("config") == config.to_dict():
        return ""
    named = [name for name, c in PRESETS.items() if c.to_dict() == saved.get("config")]
    return f"a {named[0]} model" if named else f"a model with config {saved.get('config')}"


# The base: --base must load and match --preset; lab 01's checkpoint is used when it does.
lab01 = runs_dir("01_single_device") / "model.pt"
fix = f"pass the model.pt lab 01 writes ({lab01}), or leave --base out to pretrain here"
base_ckpt = existing_file(args.base, "--base", fix) if args.base else lab01 if lab01.is_file() else None
if base_ckpt is not None:
    try:
        saved = torch.load(base_ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle weights_only refuses
        raise ConfigError(f"--base {base_ckpt} is not a checkpoint this lab can load ({type(e).__name__}); "
                          "pass the model.pt lab 01 wrote") from None
    what = base_mismatch(saved) if isinstance(saved, dict) and "model" in saved else "no 'config'/'model'"
    if what and args.base:
        raise ConfigError(f"--base {base_ckpt} holds {what}, not {args.preset}; pass the --preset it was "
                          f"trained as, or a checkpoint of {args.preset}")
    if what:
        note(f"lab 01's checkpoint {lab01} holds {what}, not {args.preset}: pretraining here instead")
        base_ckpt = None
BASE = f"loaded {base_ckpt}" if base_ckpt else (
    f"no checkpoint of {args.preset} at {lab01}; pretraining it on handbook for {pre_cfg.steps} steps (run "
    "lab 01 first to reuse its checkpoint, or pass --base)")


def val_losses(model: GPT) -> dict[str, float]:
    return {name: evaluate(model, d.val, 8, config.block_size, batches=4)
            for name, d in (("dialogues", dialogues), ("handbook", handbook))}


# %% 1. A pretrained base: the checkpoint chosen in the setup, else pretrain here (DDP on several ranks)
def pretrained_base(device: torch.device) -> tuple[GPT, list[float] | None]:
    """The base model, and its pretraining losses when it was trained here."""
    base = fresh_model(config, device=device)
    if base_ckpt is not None:
        base.load_state_dict(torch.load(base_ckpt, map_location="cpu", weights_only=True)["model"])
        return base, None
    return base, finetune(base, handbook, pre_cfg).losses  # every parameter is trainable here


# %% 2. LoRA through PEFT: adapters on the targeted linears, everything else frozen
def with_lora(base: GPT) -> GPT:
    return apply_peft_lora(copy.deepcopy(base), spec)


# %% 3. Memory of one step per rank, full fine-tuning vs LoRA: measured next to the estimate
def memory(base: GPT, device: torch.device) -> dict[str, dict] | str:
    """The measured and estimated table, or why the estimate cannot be made for this model."""
    n = dist.get_world_size()
    batch = get_batch(dialogues.train, args.batch_size // n, config.block_size, step=0, seed=0)
    x, y = (t.to(device) for t in batch)
    try:
        return step_memory(base, spec, ft_cfg, x, y, batch_size=args.batch_size, dp=n)  # on copies of base
    except ConfigError as e:  # the estimator's LoRA terms know GPT-2's layout only
        return f"not estimated: {e}"


# %% 4. Fine-tune the adapters on dialogues (under DDP only adapter gradients are all-reduced)
def fine_tune(model: GPT, base: GPT) -> tuple[list[float], bool]:
    """The training losses, and whether the base weights are bitwise what they were."""
    losses = finetune(model, dialogues, ft_cfg).losses
    base_sd, now_sd = base.state_dict(), base_state_dict(model)
    return losses, all(torch.equal(base_sd[k], now_sd[k]) for k in base_sd)


# %% 5. Across ranks: identical adapters, and a short run equal to one process on the full batch
def across_ranks(model: GPT, base: GPT) -> dict[str, float]:
    if dist.get_world_size() == 1:
        return {}
    short = TrainConfig(steps=5, batch_size=args.batch_size, lr=args.lr, warmup_steps=1)
    return {"adapter_diff_across_ranks": max_diff_from_rank0(adapter_state_dict(model)),
            "adapter_diff_vs_one_process": ddp_vs_one_process(base, spec, dialogues, short)}


# %% 6. Save the adapters (and the base) and load them back; 7. merge W + (alpha/r) B A into W
def files_and_merge(model: GPT, base: GPT, device: torch.device) -> tuple[dict, dict]:
    """Rank 0 writes and reloads the files; every rank checks merging on a copy, so `model` keeps
    its exact base weights (W + BA - BA is W only up to rounding)."""
    x = get_batch(dialogues.val, 4, config.block_size, step=0, seed=1)[0].to(device)
    files = save_and_reload(model, spec, runs_dir(LAB) / "adapter", x) if is_rank0() else {}
    return files, merge_parity(model, base, spec, x)


# %% 8. A sample: the fine-tuned model continues a dialogue
def sample(model: GPT, device: torch.device) -> str:
    prompt = "STUDENT: Why is my all-reduce so slow?\nMENTOR:"
    ids = torch.tensor([dialogues.tokenizer.encode(prompt)], device=device)
    seeded = torch.Generator(device=device).manual_seed(0)
    out = model.generate(ids, 100, temperature=0.8, top_k=40, generator=seeded)
    return dialogues.tokenizer.decode(out[0].tolist())


# %% Every rank runs the steps in order and prints what to look at
def checks(parity: dict, files: dict, merged: dict) -> dict[str, float | None]:
    """The lab's equalities by name (None: not run with one rank, or not on this rank)."""
    return {"adapters: every rank vs rank 0": parity.get("adapter_diff_across_ranks"),
            "adapters: 5 DDP steps vs one process": parity.get("adapter_diff_vs_one_process"),
            "logits: reloaded files vs trained": files.get("round_trip_diff"),
            "logits: merged vs unmerged": merged["merge_diff"],
            "logits: unmerged again vs unmerged": merged["unmerge_diff"],
            "logits: scratch LoRALinear vs PEFT": merged["scratch_vs_peft_diff"],
            "logits: the two merged": merged["scratch_vs_peft_merged_diff"]}


def shown(before: dict[str, float], after: dict[str, float] | None = None) -> str:
    return ", ".join(f"{k} {v:.3f}" + (f" -> {after[k]:.3f}" if after else "") for k, v in before.items())


def rank_main() -> dict:
    device = comm_device()  # gloo: the CPU; NCCL: this rank's GPU
    print0(f"base: {BASE}")
    base, pretrain = pretrained_base(device)
    before = val_losses(base)
    print0(f"base model validation loss: {shown(before)}"
           + (f" (pretraining loss {pretrain[0]:.3f} -> {pretrain[-1]:.3f})\n" if pretrain else "\n"))
    model = with_lora(base)
    trainable, total = param_counts(model)
    print0(describe(model, spec))
    mem = memory(base, device)
    table = mem if isinstance(mem, str) else memory_table(mem)
    print0(f"\nmemory of one training step per rank, fp32 AdamW:\n{table}\n")
    losses, base_unchanged = fine_tune(model, base)
    after = val_losses(model)
    print0(f"LoRA on dialogues, {ft_cfg.steps} steps: training loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
           f"validation loss {shown(before, after)}; base weights bitwise unchanged: {base_unchanged}")
    parity = across_ranks(model, base)
    files, merged = files_and_merge(model, base, device)
    print0(f"adapter file {fmt_bytes(files.get('adapter', 0))} vs base {fmt_bytes(files.get('base', 0))}")
    print0(checks_table(checks(parity, files, merged), tol=1e-5))
    text = sample(model, device)
    print0(f"\nsample (more --pretrain-steps, or lab 01's checkpoint, give more readable text):\n{text}\n")
    result = {"world_size": dist.get_world_size(), "preset": args.preset, "lora": spec,
              "trainable_params": trainable, "total_params": total, "pretrain": pre_cfg.to_dict(),
              "finetune": ft_cfg.to_dict(), "losses": losses, "val_before": before, "val_after": after,
              "base_unchanged": base_unchanged, "memory": mem, "parity": parity, **merged, "files": files,
              "sample": text}
    print0(f"wrote {save_json(LAB, 'result', {**result, 'lora': asdict(spec)})}")
    return {k: v for k, v in result.items() if k != "memory"}


# %% Launch: one process by default; under torchrun each process is one rank
if __name__ == "__main__":
    launch(rank_main, world)
