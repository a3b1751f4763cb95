"""`journey` command line: quick answers without writing a script.

Exit status: 0 done; 2 bad input (the message names the fix); 3 `journey plan --gpu-mem M`
computed a plan that does not fit in M per GPU, so a launch script can gate on it.
"""

from __future__ import annotations

import argparse
import os
import sys

from journey_dist.config import PRESETS, ConfigError

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3  # journey plan --gpu-mem: some pipeline stage peaks above the memory given


def _cmd_presets(_args: argparse.Namespace) -> None:
    import torch

    from journey_dist.model import GPT

    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'kv':>3} {'d_model':>7} {'mlp':>6} {'vocab':>7} "
          f"{'ctx':>5} {'norm / mlp / positions':<26} {'params':>15}")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):  # count without allocating
            n = GPT(cfg).num_params()
        arch = f"{cfg.norm} / {cfg.mlp} / {cfg.positions}"
        print(f"{name:<12} {cfg.n_layer:>6} {cfg.n_head:>5} {cfg.kv_heads:>3} {cfg.n_embd:>7} "
              f"{cfg.mlp_dim:>6} {cfg.vocab_size:>7} {cfg.block_size:>5} {arch:<26} {n:>15,}")


def _cmd_estimate(args: argparse.Namespace) -> None:
    from journey_dist.labkit import RUNS_ENV, check_writable_dir
    from journey_dist.memory.report import estimate_command
    from journey_dist.runtime import runs_dir

    if args.out is not None:
        os.environ[RUNS_ENV] = args.out
    # before estimating or measuring: the results (runs/estimate/<name>.json, .png) must be writable
    check_writable_dir(runs_dir("estimate"), "pass --out DIR (or set JOURNEY_RUNS_DIR) to write elsewhere")
    estimate_command(args)


def _estimate_arguments(parser: argparse.ArgumentParser) -> None:
    from journey_dist.memory.report import add_estimate_arguments

    add_estimate_arguments(parser)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write results under DIR/estimate/ (default: $JOURNEY_RUNS_DIR or ./runs)")


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from journey_dist.config import ParallelConfig, get_preset
    from journey_dist.plan import make_plan, parse_bytes, plan_text

    pcfg = ParallelConfig(dp=args.dp, tp=args.tp, pp=args.pp, microbatches=args.microbatches,
                          zero=args.zero, sequence_parallel=args.sequence_parallel, schedule=args.schedule,
                          cp=args.cp, cp_design=args.cp_design)
    plan = make_plan(get_preset(args.preset), pcfg, batch=args.batch, seq=args.seq, dtype=args.dtype,
                     optimizer=args.optimizer, world=args.world, device=args.device,
                     gpu_mem=None if args.gpu_mem is None else parse_bytes(args.gpu_mem))
    print(json.dumps(plan, indent=1) if args.json else plan_text(plan))
    return EXIT_DOES_NOT_FIT if plan["fits"] is False else 0


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    from journey_dist.memory.estimate import DTYPES

    parser.add_argument("--preset", default="gpt-mini")
    for name in ("dp", "tp", "pp", "microbatches"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1, help="context-parallel ranks (each holds seq/cp tokens)")
    parser.add_argument("--cp-design", default="ring", choices=["ring", "zigzag", "ulysses"],
                        help="with --cp: ring attention, ring with zigzag balance, or Ulysses all-to-all")
    parser.add_argument("--batch", type=int, default=8, help="global batch in sequences per step")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: block_size)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES,
                        help="as `journey estimate`: bf16 = pure bf16; bf16-mixed = + fp32 master weights; "
                             "bf16-megatron = + fp32 main grads, reduced in fp32")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "none"])
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--sequence-parallel", "--sp", action="store_true", help="needs tp > 1")
    parser.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    parser.add_argument("--gpu-mem", default=None, help="memory per GPU, e.g. 80GB or 80GiB: say what "
                        f"fits; the exit status is {EXIT_DOES_NOT_FIT} when the plan does not fit")
    parser.add_argument("--world", type=int, default=None,
                        help="ranks you will launch (checked = dp*cp*tp*pp)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="memory terms for this device")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _cmd_checkpoints(args: argparse.Namespace) -> None:
    from pathlib import Path

    from journey_dist.checkpoint import latest_valid, list_checkpoints

    if not Path(args.dir).is_dir():
        raise ConfigError(f"checkpoint directory {args.dir!r} does not exist; pass the directory "
                          "a run saved into (e.g. runs/10_reliability/ckpt/file)")
    found = list_checkpoints(args.dir)
    if not found:
        print(f"no checkpoints in {args.dir}")
        return
    best = latest_valid(args.dir, warn=False)
    print(f"{'checkpoint':<22} {'step':>6} {'kind':>4} {'MiB':>8}  status")
    for c in found:
        status = "ok" if c.valid else f"INVALID: {c.reason}"
        mark = "  <- resume point" if best is not None and c.path == best.path else ""
        print(f"{c.path.name:<22} {c.step:>6} {c.kind:>4} {c.nbytes / 2**20:>8.2f}  {status}{mark}")
    if best is None:
        print("no valid checkpoint: a resume would start from step 0")


def _checkpoints_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a directory a run saved checkpoints into")


def _cmd_notebooks(args: argparse.Namespace) -> None:
    from pathlib import Path

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
             "stage, communication per step, bubble", _plan_arguments),
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
