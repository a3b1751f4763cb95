"""`journey` command line: quick answers without writing a script.

Exit status: 0 done; 2 bad input (the message names the fix); 3 `journey plan --gpu-mem M`
computed a plan that does not fit in M per GPU, so a launch script can gate on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from journey_dist.calibrate import calibrate
from journey_dist.checkpoint import checkpoints_table
from journey_dist.cluster import (
    CLUSTERS,
    OVERRIDES,
    cluster_toml,
    get_cluster,
    load_cluster,
    override,
    parse_count,
)
from journey_dist.config import PIPELINE_SCHEDULES, PRESETS, ConfigError, ParallelConfig, get_preset
from journey_dist.labkit import RUNS_ENV, check_writable_dir, positive_int
from journey_dist.memory.estimate import DTYPES, param_count
from journey_dist.memory.report import add_estimate_arguments, estimate_command
from journey_dist.model import GPT
from journey_dist.plan import make_plan, parse_bytes, plan_text
from journey_dist.runtime import runs_dir
from journey_dist.search import LONG_SEQ, dp_for, search_layouts, search_text
from journey_dist.steptime import predict_step, time_summary, time_text

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3  # journey plan --gpu-mem: some pipeline stage peaks above the memory given


def _cmd_presets(_args: argparse.Namespace) -> None:
    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'kv':>3} {'d_model':>7} {'mlp':>6} {'vocab':>7} "
          f"{'ctx':>5} {'norm / mlp / positions':<26} {'params':>15}  experts")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):  # count without allocating
            n = GPT(cfg).num_params()
        arch = f"{cfg.norm} / {cfg.mlp} / {cfg.positions}"
        width = cfg.expert_dim if cfg.n_experts else cfg.mlp_dim  # an MoE: each expert's width
        experts = f"  {cfg.n_experts}, top-{cfg.moe_top_k}" if cfg.n_experts else ""
        print(f"{name:<12} {cfg.n_layer:>6} {cfg.n_head:>5} {cfg.kv_heads:>3} {cfg.n_embd:>7} "
              f"{width:>6} {cfg.vocab_size:>7} {cfg.block_size:>5} {arch:<26} {n:>15,}{experts}")


def _cmd_estimate(args: argparse.Namespace) -> None:
    if args.out is not None:
        os.environ[RUNS_ENV] = args.out
    # before estimating or measuring: the results (runs/estimate/<name>.json, .png) must be writable
    check_writable_dir(runs_dir("estimate"), "pass --out DIR (or set JOURNEY_RUNS_DIR) to write elsewhere")
    estimate_command(args)


def _estimate_arguments(parser: argparse.ArgumentParser) -> None:
    add_estimate_arguments(parser)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write results under DIR/estimate/ (default: $JOURNEY_RUNS_DIR or ./runs)")


def _cmd_plan(args: argparse.Namespace) -> int:
    cfg = get_preset(args.preset)
    cluster = _plan_cluster(args)
    seq = cfg.block_size if args.seq is None else args.seq
    batch, batch_note = _plan_batch(args, seq)
    dtype = args.dtype or ("bf16-mixed" if cluster is not None and cluster.shared_cores is None else "fp32")
    device = args.device or ("cpu" if cluster is not None and cluster.shared_cores is not None else "cuda")
    tokens = (parse_count(args.train_tokens, "--train-tokens") if args.train_tokens
              else _chinchilla_tokens(cfg))
    tokens_note = "" if args.train_tokens else " (20 per parameter)"
    if args.gpus is not None and args.world is not None and args.world != args.gpus:
        raise ConfigError(f"--world {args.world} and --gpus {args.gpus} disagree; give one of them")
    schedule = args.schedule or "1f1b"
    virtual_stages = args.virtual_stages or (2 if schedule == "interleaved" else 1)
    if args.search:
        if schedule not in ("1f1b", "gpipe"):
            raise ConfigError("--search ranks layouts with the 1f1b or gpipe schedule; drop --schedule "
                              "(or plan that layout without --search)")
        if cluster is None or args.gpus is None:
            raise ConfigError("--search ranks layouts of a cluster: give --gpus N and --gpu NAME "
                              "(or --cluster FILE)")
        if args.gpu_mem is not None:
            cluster = replace(cluster, memory=parse_bytes(args.gpu_mem))
        result = search_layouts(
            cfg, cluster, gpus=args.gpus, seq=seq, batch=batch, dtype=dtype, optimizer=args.optimizer,
            overlap=not args.no_overlap, tp=args.tp, pp=args.pp, dp=args.dp, zero=args.zero,
            microbatches=args.microbatches, schedule=schedule, device=device,
            sequence_parallel=True if args.sequence_parallel else None,
            recomputes=(args.recompute,) if args.recompute else None, ep=args.ep, cp=args.cp,
            cp_design=args.cp_design)
        if args.json:
            print(json.dumps([{"layout": c.label(), "parallel": c.pcfg.__dict__, "micro_batch": c.micro_batch,
                               "recompute": c.recompute, "peak": c.peak, **time_summary(c.step, tokens)}
                              for c in result.ranked[:args.top or 5]], indent=1))
            return 0
        print(f"search: {args.preset} on {args.gpus} x {cluster.gpu}, global batch {batch} x {seq} tokens"
              f"{batch_note}, {dtype}, {args.optimizer}")
        print(search_text(result, cluster, top=args.top or 5, gpus=args.gpus, seq=seq, batch=batch,
                          train_tokens=tokens))
        return 0
    if args.top is not None:
        raise ConfigError("--top says how many layouts --search prints; add --search or drop --top")
    tp, pp, cp = args.tp or 1, args.pp or 1, args.cp or 1
    if args.cp_design is not None and cp == 1:
        raise ConfigError(f"--cp-design {args.cp_design} says how --cp splits each sequence; add --cp N "
                          "(N > 1) or drop --cp-design")
    if args.gpus is not None and args.dp is None and args.gpus % cp:
        raise ConfigError(f"--gpus {args.gpus} is not a multiple of --cp {cp}; use a cp dividing it")
    dp = args.dp if args.dp is not None else (
        1 if args.gpus is None else dp_for(args.gpus // cp, tp, pp))
    world = args.world if args.gpus is None else args.gpus
    pcfg = ParallelConfig(dp=dp, tp=tp, pp=pp, microbatches=args.microbatches or 1, zero=args.zero or 0,
                          sequence_parallel=args.sequence_parallel, schedule=schedule,
                          ep=1 if args.ep is None else args.ep, virtual_stages=virtual_stages, cp=cp,
                          cp_design=args.cp_design or "ring")
    gpu_mem = parse_bytes(args.gpu_mem) if args.gpu_mem is not None else (
        cluster.memory if cluster is not None else None)
    recompute = args.recompute or "none"
    plan = make_plan(cfg, pcfg, batch=batch, seq=seq, dtype=dtype, optimizer=args.optimizer, world=world,
                     device=device, gpu_mem=gpu_mem, recompute=recompute == "full")
    text = plan_text(plan)
    if cluster is not None and plan["fits"] is not False:
        st = predict_step(cfg, pcfg, cluster, batch=batch, seq=seq, dtype=dtype, optimizer=args.optimizer,
                          recompute=recompute, overlap=not args.no_overlap, virtual_stages=virtual_stages)
        plan["cluster"] = cluster.to_dict()
        plan["time"] = time_summary(st, tokens)
        text += "\n\n" + time_text(st, cluster, pcfg, tokens, tokens_note)
    elif cluster is not None:
        text += "\nnot timed: the layout does not fit (see above)"
    elif args.no_overlap or args.train_tokens or args.recompute:
        raise ConfigError("--no-overlap, --train-tokens and --recompute shape the time model: also give "
                          "--gpu NAME (or --cluster FILE)")
    print(json.dumps(plan, indent=1) if args.json else text)
    return EXIT_DOES_NOT_FIT if plan["fits"] is False else 0


def _plan_cluster(args: argparse.Namespace):
    """The cluster --gpu or --cluster names, with any per-number flags applied (None: no time model)."""
    values = {key: getattr(args, key) for key in OVERRIDES}
    if args.cluster is not None and args.gpu is not None:
        raise ConfigError("give --gpu NAME or --cluster FILE, not both (a cluster file names its base GPU)")
    if args.cluster is not None:
        return override(load_cluster(args.cluster), **values)
    if args.gpu is not None:
        return get_cluster(args.gpu, **values)
    if any(v is not None for v in values.values()):
        given = [f"--{k.replace('_', '-')}" for k, v in values.items() if v is not None]
        raise ConfigError(f"{', '.join(given)} changes a cluster: also give --gpu NAME or --cluster FILE")
    return None


def _plan_batch(args: argparse.Namespace, seq: int) -> tuple[int, str]:
    """Global batch in sequences: --batch, or --global-batch-tokens / seq (rounded, and said so)."""
    if args.global_batch_tokens is None:
        return (8 if args.batch is None else args.batch), ""
    if args.batch is not None:
        raise ConfigError("give --batch (sequences) or --global-batch-tokens, not both")
    tokens = parse_count(args.global_batch_tokens, "--global-batch-tokens")
    batch = max(1, round(tokens / seq))
    exact = batch * seq == tokens
    return batch, "" if exact else f" ({args.global_batch_tokens} tokens rounded to {batch} sequences)"


def _chinchilla_tokens(cfg) -> float:
    return 20.0 * param_count(cfg)


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt-mini")
    for name in ("dp", "tp", "pp"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help="default 1 (--gpus: dp = gpus / (tp pp)); with --search: fix it")
    parser.add_argument("--microbatches", type=int, default=None, help="per dp replica (default 1; "
                        "with --search: fix it)")
    parser.add_argument("--ep", type=int, default=None, help="expert parallel (MoE presets): experts split "
                        "over ep ranks inside dp (ep divides dp and the number of experts; default 1; with "
                        "--search: fix it)")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch in sequences per step (default 8)")
    parser.add_argument("--global-batch-tokens", default=None, metavar="N",
                        help="global batch in tokens, e.g. 4M or 4Mi (sequences = N / seq, rounded)")
    parser.add_argument("--cp", type=int, default=None,
                        help="context-parallel ranks (each holds seq/cp tokens; default 1; with --search: "
                        f"fix it, else cp is searched from --seq {LONG_SEQ} on)")
    parser.add_argument("--cp-design", default=None, choices=["ring", "zigzag", "ulysses"],
                        help="with --cp: ring attention, ring with zigzag balance, or Ulysses all-to-all")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: block_size)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="as `journey estimate`: bf16 = pure bf16; bf16-mixed = + fp32 master weights; "
                             "bf16-megatron = + fp32 main grads, reduced in fp32 (default: fp32; bf16-mixed "
                             "with --gpu)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "none"])
    parser.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3])
    parser.add_argument("--sequence-parallel", "--sp", action="store_true",
                        help="needs tp > 1 (with --search: only layouts with it)")
    parser.add_argument("--schedule", default=None, choices=PIPELINE_SCHEDULES,
                        help="pipeline schedule: its bubble and the activations each stage holds "
                        "(default 1f1b)")
    parser.add_argument("--virtual-stages", type=int, default=None,
                        help="chunks of layers per pipeline rank (interleaved; default 2 there, else 1)")
    parser.add_argument("--gpu-mem", default=None, help="memory per GPU, e.g. 80GB or 80GiB: say what "
                        f"fits; the exit status is {EXIT_DOES_NOT_FIT} when the plan does not fit "
                        "(default with --gpu: its HBM)")
    parser.add_argument("--world", type=int, default=None,
                        help="ranks you will launch (checked = dp*cp*tp*pp)")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"],
                        help="memory terms for this device (default: cuda; cpu with --gpu cpu-gloo)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    time = parser.add_argument_group("time model (steptime.py): step time, tokens/s, MFU, time to train")
    time.add_argument("--gpu", default=None, help=f"a cluster preset: {', '.join(CLUSTERS)}")
    time.add_argument("--cluster", default=None, metavar="FILE.toml",
                      help="a cluster file: base = a preset, plus any of the numbers below")
    time.add_argument("--gpus", type=int, default=None, help="GPUs in the run (= dp*tp*pp)")
    for key in OVERRIDES:
        time.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None, metavar="X",
                          type=float if key != "gpus_per_node" else int)
    time.add_argument("--recompute", default=None, choices=["none", "full"],
                      help="full: every block's forward again in backward (default none; --search: both)")
    time.add_argument("--no-overlap", action="store_true",
                      help="dp/ZeRO collectives run after the flush, nothing hidden behind compute")
    time.add_argument("--train-tokens", default=None, metavar="N",
                      help="tokens to train, e.g. 15T (default: 20 per parameter)")
    time.add_argument("--search", action="store_true",
                      help="rank every layout of --gpus that fits by predicted throughput")
    time.add_argument("--top", type=int, default=None, help="layouts --search prints (default 5)")


def _cmd_calibrate(args: argparse.Namespace) -> None:
    if args.out is not None:
        os.environ[RUNS_ENV] = args.out
    out = check_writable_dir(runs_dir("calibrate"), "pass --out DIR (or set JOURNEY_RUNS_DIR) to write "
                             "elsewhere")
    cluster, measured = calibrate(repeats=args.repeats)
    out.mkdir(parents=True, exist_ok=True)
    record = {"cluster": cluster.to_dict(), **measured}
    (out / "calibration.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "cpu-gloo.toml").write_text(cluster_toml(cluster, "cpu-gloo"))
    ar = measured["allreduce"]
    print(f"matmul (1 thread, fp32)   {cluster.peak_flops / 1e9:8.2f} GFLOP/s\n"
          f"memory bandwidth          {cluster.memory_bandwidth / 1e9:8.2f} GB/s\n"
          f"gloo all-reduce           {ar['latency'] * 1e6:8.1f} us per step, "
          f"{ar['bandwidth'] / 1e9:.3f} GB/s\n"
          f"GPT-mini step efficiency  {cluster.compute_efficiency:8.3f} of the matmul rate\n"
          f"(timings as on an idle machine: waits for a CPU behind other jobs removed)\n"
          f"wrote {out / 'calibration.json'} and {out / 'cpu-gloo.toml'}: "
          f"journey plan --cluster {out / 'cpu-gloo.toml'} ...")


def _calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=positive_int, default=15, help="timings per measurement (median)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write DIR/calibrate/ (default: $JOURNEY_RUNS_DIR or ./runs)")


def _cmd_checkpoints(args: argparse.Namespace) -> None:
    if not Path(args.dir).is_dir():
        raise ConfigError(f"checkpoint directory {args.dir!r} does not exist; pass the directory "
                          "a run saved into (e.g. runs/10_reliability/ckpt/file)")
    print(checkpoints_table(args.dir))


def _checkpoints_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a directory a run saved checkpoints into")


def _cmd_notebooks(args: argparse.Namespace) -> None:
    # deferred: jupytext and nbformat come with the optional [notebooks] extra
    from journey_dist.notebooks import ARGS_ENV, SOURCE_ENV, find_labs, write_notebooks

    for w in write_notebooks(find_labs(args.labs), Path(args.out), args.source):
        inner = (f"; {w.inner_markers} `# %%` inside a function kept as comments (a cell starts at top "
                 "level)") if w.inner_markers else ""
        print(f"{'wrote' if w.changed else 'unchanged'} {w.path}: {w.code_cells} code cells from "
              f"{w.lab.name}{inner}")
    print(f"Arguments: set {ARGS_ENV} or edit LAB_ARGS in a notebook's second code cell. Colab: upload "
          f"a notebook and set {SOURCE_ENV} in its first cell (or pass --source when generating).")


def _notebooks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labs", nargs="*", metavar="LAB",
                        help="labs to convert: 02, 02_data_parallel or a path to a .py (default: all)")
    parser.add_argument("--out", default="notebooks",
                        help="directory for the .ipynb files (created if missing; only notebooks this "
                        "command wrote are ever replaced)")
    parser.add_argument("--source", default=None,
                        help="what the Colab cell pip-installs journey-dist from: a git URL "
                        "(git+https://...) or a clone's path (default: [project.urls] Repository in "
                        "pyproject.toml, else none: the cell asks for one)")


# name -> (function, help, add_arguments(parser) or None). New subcommands register here.
COMMANDS: dict = {
    "presets": (_cmd_presets, "list model presets and their parameter counts", None),
    "estimate": (_cmd_estimate, "memory per rank: estimated vs measured, per component (lab 07)",
                 _estimate_arguments),
    "plan": (_cmd_plan, "size a dp x cp x tp x pp run before launching it: validation, mesh, memory per "
             "stage, communication per step, bubble; with --gpu: step time, MFU, time to train, --search",
             _plan_arguments),
    "calibrate": (_cmd_calibrate, "measure this machine (matmul, memory, gloo all-reduce, a GPT-mini step) "
                  "for the cpu-gloo cluster", _calibrate_arguments),
    "checkpoints": (_cmd_checkpoints, "list checkpoints in a directory, each validated, and the "
                    "one a resume would use", _checkpoints_arguments),
    "notebooks": (_cmd_notebooks, "write a Jupyter notebook (.ipynb) per lab from its # %% cells, with "
                  "a Colab install cell", _notebooks_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="journey", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if add_arguments is not None:
            add_arguments(p)
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; return the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except ConfigError as e:
        print(f"journey: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
