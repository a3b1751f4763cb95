"""Lab 08: LoRA fine-tuning through PEFT -- teach a pretrained GPT-mini a new kind of text by
training 7% of its parameters, then merge the adapters into the weights.

    python labs/08_lora_finetune.py                          # one process, about a minute on a 2-core CPU
    torchrun --nproc_per_node=2 labs/08_lora_finetune.py     # LoRA + DDP: only adapter grads are all-reduced
    python labs/08_lora_finetune.py --rank 4 --targets attn.c_attn,mlp.c_fc

GPT-mini is pretrained on the "handbook" corpus (or lab 01's checkpoint is loaded if it exists),
then fine-tuned on "dialogues" (STUDENT/MENTOR exchanges) with LoRA adapters on every block's
linears. What to look at: trainable vs total parameters; the dialogues loss falling while the
base weights stay bitwise unchanged; gradients and AdamW state only for the adapters (measured
next to the estimate, full fine-tuning vs LoRA); the adapter file is a few hundred KiB next to
a multi-MiB base; merged and unmerged models agree to float rounding (~1e-6); PEFT and the
from-scratch LoRALinear agree exactly; under 2 ranks the adapters stay identical on every rank.
Results: runs/08_lora_finetune/{result.json, adapter/}.
"""

# %% Setup: arguments, model and LoRA config, every check that can fail, before any process starts
import copy
from dataclasses import asdict

import torch
import torch.distributed as dist

from journey_dist.config import LORA_LINEARS, PRESETS, ConfigError, LoRAConfig, ParallelConfig, get_preset
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
    apply_scratch_lora,
    base_state_dict,
    finetune,
    load_adapter_state_dict,
    load_lora,
    max_diff_from_rank0,
    merge_adapters,
    param_counts,
    save_lora,
    unmerge_adapters,
)
from journey_dist.memory.estimate import estimate_memory, fmt_bytes
from journey_dist.memory.measure import measure_step
from journey_dist.parity import fresh_model, max_abs_diff
from journey_dist.runtime import is_rank0, launch, print0, requested_world_size, runs_dir, save_json
from journey_dist.train import TrainConfig, evaluate, make_optimizer

LAB = "08_lora_finetune"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--ranks", type=positive_int, default=1, help="ranks to spawn under plain python")
parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
parser.add_argument("--alpha", type=positive_float, default=16.0,
                    help="LoRA alpha (update scaled by alpha/r)")
parser.add_argument("--lora-dropout", type=probability, default=0.0)
parser.add_argument("--targets", default=",".join(LORA_LINEARS), help="comma-separated module names")
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
spec = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout,
                  targets=tuple(t.strip() for t in args.targets.split(",") if t.strip())).validate(config)
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


def val_loss(model, tokens) -> float:
    return evaluate(model, tokens, 8, config.block_size, batches=4)


# %% What every rank runs
def rank_main(handbook, dialogues) -> dict:
    n = dist.get_world_size()
    # gloo works on CPU tensors, NCCL on this rank's GPU (init_distributed picked the backend)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
        torch.device("cpu")

    # 1. A pretrained base: the checkpoint chosen in the setup, else pretrain here (DDP if n > 1)
    base = fresh_model(config, device=device)
    if base_ckpt is not None:
        base.load_state_dict(torch.load(base_ckpt, map_location="cpu", weights_only=True)["model"])
        print0(f"base: loaded {base_ckpt}")
    else:
        print0(f"base: no checkpoint of {args.preset} at {lab01}; pretraining {args.preset} on handbook "
               f"for {pre_cfg.steps} steps on {n} rank(s) (run lab 01 first to reuse its checkpoint, or "
               "pass --base)")
        run = finetune(base, handbook, pre_cfg)  # every parameter is trainable here
        print0(f"pretraining loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f}")
    before = {"dialogues": val_loss(base, dialogues.val), "handbook": val_loss(base, handbook.val)}
    print0(f"base model validation loss: dialogues {before['dialogues']:.3f} (new text), "
           f"handbook {before['handbook']:.3f}")

    # 2. LoRA through PEFT: adapters on the targeted linears, everything else frozen
    model = apply_peft_lora(copy.deepcopy(base), spec)
    trainable, total = param_counts(model)
    print0(f"\nLoRA r={spec.rank}, alpha={spec.alpha:g} (scaling {spec.scaling:g}) on "
           f"{len(spec.matched(config))} linears: {', '.join(spec.targets)}")
    print0(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%); "
           f"the base has {total - trainable:,}")
    print0(model.transformer.h[0].attn.c_attn)

    # 3. Memory of one step per rank: full fine-tuning vs LoRA, measured (exact tensor ledger on
    #    CPU) next to the analytic estimate. Copies, so the runs below start untouched.
    b = args.batch_size // n
    x, y = (t.to(device) for t in get_batch(dialogues.train, b, config.block_size, step=0, seed=0))
    memory = {}
    for name, m, lora in (("full fine-tuning", copy.deepcopy(base), None),
                          ("LoRA", apply_peft_lora(copy.deepcopy(base), spec), spec)):
        opt = make_optimizer(m, ft_cfg)
        meas = measure_step(m, opt, x, y, ledger=True)  # the ledger on CUDA too: grads, optimizer
        est = estimate_memory(config, batch_size=args.batch_size, seq_len=config.block_size, dp=n,
                              device=device.type, lora=lora)  # lora: adapters in, frozen-base savings out
        memory[name] = {"measured": meas.to_dict(), "estimated": est.to_dict(),
                        "optimizer_measured": meas.high_water["optimizer"],
                        "optimizer_estimated": est.optimizer,
                        "grads_measured": meas.high_water["grads"], "grads_estimated": est.grads,
                        "peak_measured": meas.peak, "peak_estimated": est.total}
    print0(f"\nmemory of one training step per rank ({b} x {config.block_size} tokens, fp32 AdamW, "
           f"{meas.instrument} on {device.type}):")
    print0(f"{'':<17} {'grads meas/est':>22} {'optimizer meas/est':>22} {'peak measured':>14} "
           f"{'peak estimated':>15} {'error':>7}")
    for name, r in memory.items():
        err = 100 * (r["peak_estimated"] - r["peak_measured"]) / r["peak_measured"]
        print0(f"{name:<17} {fmt_bytes(r['grads_measured']):>10} / {fmt_bytes(r['grads_estimated']):<10} "
               f"{fmt_bytes(r['optimizer_measured']):>10} / {fmt_bytes(r['optimizer_estimated']):<10} "
               f"{fmt_bytes(r['peak_measured']):>14} {fmt_bytes(r['peak_estimated']):>15} {err:+6.2f}%")
    print0("(activations barely shrink: backward still runs through every frozen layer; the "
           "saving is gradients and optimizer state)")

    # 4. Fine-tune the adapters on dialogues (DDP all-reduces only adapter gradients when n > 1)
    print0(f"\nLoRA fine-tuning on dialogues: {ft_cfg.steps} steps, global batch {ft_cfg.batch_size}")
    run = finetune(model, dialogues, ft_cfg)
    after = {"dialogues": val_loss(model, dialogues.val), "handbook": val_loss(model, handbook.val)}
    print0(f"training loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f} ({run.seconds:.1f} s)")
    print0(f"validation loss: dialogues {before['dialogues']:.3f} -> {after['dialogues']:.3f}, "
           f"handbook {before['handbook']:.3f} -> {after['handbook']:.3f}")
    base_sd, now_sd = base.state_dict(), base_state_dict(model)
    base_unchanged = all(torch.equal(base_sd[k], now_sd[k]) for k in base_sd)
    print0(f"base weights bitwise unchanged after fine-tuning: {base_unchanged}")

    # 5. Across ranks: identical adapters, and a short run equal to one process on the full batch
    parity = {}
    if n > 1:
        parity["adapter_diff_across_ranks"] = max_diff_from_rank0(adapter_state_dict(model))
        short = TrainConfig(steps=5, batch_size=args.batch_size, lr=args.lr, warmup_steps=1)
        ddp_run = finetune(apply_peft_lora(copy.deepcopy(base), spec), dialogues, short)
        one = finetune(apply_peft_lora(copy.deepcopy(base), spec), dialogues, short, ddp=False)
        adapters = {k: v for k, v in ddp_run.params.items() if ".lora_" in k}
        parity["adapter_diff_vs_one_process"] = max_abs_diff(adapters, {k: one.params[k] for k in adapters})
        print0(f"\nadapters on {n} ranks: max |rank r - rank 0| = {parity['adapter_diff_across_ranks']:.1e}; "
               f"after 5 DDP steps vs one process on the full batch: "
               f"{parity['adapter_diff_vs_one_process']:.1e} (tolerance 1e-5)")

    # 6. Save the adapters (and the base, trained here) and load them back
    files = {}
    xv = get_batch(dialogues.val, 4, config.block_size, step=0, seed=1)[0].to(device)
    if is_rank0():
        paths = save_lora(model, spec, runs_dir(LAB) / "adapter")
        files = {k: p.stat().st_size for k, p in paths.items()}
        loaded = load_lora(paths["adapter"].parent)[0].to(device)
        with torch.no_grad():
            files["round_trip_diff"] = (loaded.eval()(xv)[0] - model.eval()(xv)[0]).abs().max().item()
        print0(f"\nadapter file {fmt_bytes(files['adapter'])} ({paths['adapter']}) vs base "
               f"{fmt_bytes(files['base'])}; reloaded model's logits differ by "
               f"{files['round_trip_diff']:.1e}")

    # 7. Merge W + (alpha/r) B A into W: the same logits without the adapter path. On a copy, so
    #    `model` keeps its exact base weights (W + BA - BA is W only up to rounding).
    with torch.no_grad():
        unmerged = model.eval()(xv)[0]
        merged_model = copy.deepcopy(model)
        merge_adapters(merged_model)
        merged = merged_model(xv)[0]
        unmerge_adapters(merged_model)
        again = merged_model(xv)[0]
        scratch = apply_scratch_lora(copy.deepcopy(base).eval(), spec)
        load_adapter_state_dict(scratch, adapter_state_dict(model))
        scratch_out = scratch(xv)[0]
        merge_adapters(scratch)
        scratch_merged = scratch(xv)[0]
    merge_diff = (merged - unmerged).abs().max().item()
    unmerge_diff = (again - unmerged).abs().max().item()
    scratch_diff = (scratch_out - unmerged).abs().max().item()
    scratch_merge_diff = (scratch_merged - merged).abs().max().item()
    print0(f"\nlogits merged vs unmerged: max |diff| {merge_diff:.1e}; after unmerge {unmerge_diff:.1e} "
           "(float rounding of W + BA - BA)")
    print0(f"from-scratch LoRALinear with the same A, B vs PEFT: {scratch_diff:.1e} unmerged, "
           f"{scratch_merge_diff:.1e} merged")

    # 8. A sample: the fine-tuned model continues a dialogue
    prompt = "STUDENT: Why is my all-reduce so slow?\nMENTOR:"
    ids = torch.tensor([dialogues.tokenizer.encode(prompt)], device=device)
    out = model.generate(ids, 100, temperature=0.8, top_k=40,
                         generator=torch.Generator(device=device).manual_seed(0))
    sample = dialogues.tokenizer.decode(out[0].tolist())
    print0(f"\nsample (more --pretrain-steps, or lab 01's checkpoint, give more readable text):\n{sample}\n")

    result = {"world_size": n, "preset": args.preset, "lora": spec, "trainable_params": trainable,
              "total_params": total, "pretrain": pre_cfg.to_dict(), "finetune": ft_cfg.to_dict(),
              "losses": run.losses, "val_before": before, "val_after": after,
              "base_unchanged": base_unchanged,
              "memory": memory, "parity": parity, "merge_diff": merge_diff, "unmerge_diff": unmerge_diff,
              "scratch_vs_peft_diff": scratch_diff, "scratch_vs_peft_merged_diff": scratch_merge_diff,
              "files": files, "sample": sample}
    path = save_json(LAB, "result", {**result, "lora": asdict(spec)})
    print0(f"wrote {path}")
    return {k: v for k, v in result.items() if k != "memory"}


# %% Launch: one process by default; under torchrun each process is one rank
if __name__ == "__main__":
    launch(rank_main, world, handbook, dialogues)
