"""Lab 12: mixture of experts and expert parallel -- routing, all-to-all, load balance, measured.

    python labs/12_mixture_of_experts.py                     # spawns 2 ranks: dp=2, experts split ep=2
    python labs/12_mixture_of_experts.py --ranks 4 --ep 4    # 2 experts per rank
    python labs/12_mixture_of_experts.py --ranks 4 --ep 2    # 2 copies of each expert half
    torchrun --nproc_per_node=2 labs/12_mixture_of_experts.py

moe-mini is gpt-mini with every MLP replaced by 8 experts (each half as wide) and a router that
sends each token to its top 2: four times the MLP weights, the same weights per token. Expert
parallel splits the experts over ep ranks inside data parallel; a token's rows travel to the ranks
that own its experts by all-to-all (counts first, then rows) and come back the same way.
What to look at: total vs active parameters; the router logits, the loss of every step and every
first-step gradient next to one process (fp32, within 1e-5), without dropping and with a capacity
factor (the same pairs dropped as one process: capacity and queue order are the global batch's);
per step the tokens per expert, the load imbalance (max/mean), the dropped pairs, the balance
loss, and the all-to-all calls and bytes the CommLedger measured next to the formula for that
step's routing; each rank's expert parameters and AdamW state measured vs the estimator; last, the
same short training with and without the load-balancing loss: the router collapses onto one
expert per layer without it (imbalance near E/k = 4) and spreads out again with it.
Results: runs/12_mixture_of_experts/result.json
"""

# %% Setup: arguments, the model, and every check that can fail, before any process starts
import torch.distributed as dist

from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import get_batch, load_tokens
from journey_dist.labkit import check_data, check_memory, lab_parser, parse, positive_float, positive_int
from journey_dist.memory.estimate import estimate_memory
from journey_dist.memory.sizes import active_param_count, expert_param_count, param_count, param_tensor_count
from journey_dist.mesh import build_mesh
from journey_dist.parallel.expert.layer import expert_group_ranks
from journey_dist.parallel.expert.parallelize import (
    expert_groups_of,
    expert_parallel,
    router_parity,
    run_expert_parallel,
)
from journey_dist.parity import fresh_model, reference_run, worst_diffs
from journey_dist.report import bytes_table, fixed, ledger_table, losses_table, num, parity_table, table
from journey_dist.runtime import launch, print0, requested_world_size, save_json
from journey_dist.train import TrainConfig

LAB = "12_mixture_of_experts"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="moe-mini", help="an MoE preset: moe-mini or mixtral-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--ranks", type=positive_int, default=2, help="data-parallel ranks to spawn (python)")
parser.add_argument("--ep", type=positive_int, default=None, help="expert-parallel ranks (default: all)")
parser.add_argument("--top-k", type=int, default=None, help="experts per token (default: the preset's)")
parser.add_argument("--capacity-factor", type=float, default=1.0,
                    help="capacity factor of the run with dropping (> 0; 1.0: room for an even load)")
parser.add_argument("--steps", type=positive_int, default=3, help="AdamW steps of the parity runs")
parser.add_argument("--batch-size", type=positive_int, default=8, help="global batch (sequences)")
parser.add_argument("--lr", type=positive_float, default=3e-3)
parser.add_argument("--balance-steps", type=positive_int, default=30,
                    help="steps of the training with and without the load-balancing loss")
parser.add_argument("--balance-lr", type=positive_float, default=1e-3)
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

TOL, PARAM_TOL = 1e-5, 1e-4  # fp32; parameters: AdamW's lr·g/(|g| + eps) near eps (see tests)
world = requested_world_size(args.ranks)
config = get_preset(args.preset)
if not config.n_experts:
    raise ConfigError(f"--preset {args.preset} is dense (no experts); use moe-mini or mixtral-mini")
if args.top_k is not None:
    config = config.with_(moe_top_k=args.top_k)
dropping = config.with_(moe_capacity_factor=args.capacity_factor)
pcfg = ParallelConfig(dp=world, ep=world if args.ep is None else args.ep)
pcfg.validate(dropping, world, args.batch_size)
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=1, eval_batches=1)
balance_cfg = TrainConfig(steps=args.balance_steps, batch_size=args.batch_size, lr=args.balance_lr,
                          warmup_steps=2, eval_batches=1)


# %% What every rank runs
def ep_rows(run) -> list[dict]:
    """Per step: the whole batch's routing (layer 0's tokens per expert) and rank 0's all-to-alls."""
    rows = []
    for i, (r, s) in enumerate(zip(run.details["routing"], run.details["steps"])):
        ep = next((g for g in s["comm"] if "ep" in g.split("=")), None)
        got = s["comm"].get(ep, {}).get("all_to_all", {})
        want = s["formula"].get(ep, {}).get("all_to_all", {})
        same = (got.get("calls"), got.get("bytes")) == (want.get("calls"), want.get("bytes"))
        rows.append({"step": i, "loss": run.losses[i], "tokens": str(r["counts"][0]),
                     "imbalance": r["imbalance"], "dropped": r["dropped"], "balance": r["balance"],
                     "calls": got.get("calls", 0), "bytes": got.get("bytes", 0),
                     "formula": want.get("bytes", 0), "match": "yes" if same else "NO"})
    return rows


STEP_COLUMNS = [("step", "step", str), ("loss", "loss", fixed(4)),
                ("tokens", "layer 0 pairs per expert", str), ("imbalance", "max/mean", fixed(2)),
                ("dropped", "dropped", str), ("balance", "balance loss", fixed(3)),
                ("calls", "a2a calls", str), ("bytes", "a2a bytes", num), ("formula", "formula", num),
                ("match", "match", str)]


def rank_main(data) -> dict:
    mesh = build_mesh(pcfg)
    groups = expert_groups_of(mesh)
    E, ep = config.n_experts, pcfg.ep
    eps, edps = expert_group_ranks(list(range(pcfg.dp)), ep)
    print0(f"dp={pcfg.dp} ranks ({dist.get_backend()}), experts split over ep={ep}: ep groups {eps} "
           f"(all-to-all), edp groups {edps} (hold the same experts: their gradients are all-reduced)")
    print0("  " + "; ".join(f"ep rank {p} holds experts {p * E // ep}..{(p + 1) * E // ep - 1}"
                            for p in range(ep)))
    total, active = param_count(config), active_param_count(config)
    counts = {"total": total, "active per token": active,
              "gpt-mini (dense)": param_count(get_preset("gpt-mini")),
              f"per rank (ep={ep})": param_count(config, ep=ep),
              "its experts": expert_param_count(config, ep)}
    print0(table([{"what": "parameters", **counts}],
                 [("what", args.preset, str), *((k, k, num) for k in counts)]))

    # router logits at the start: this rank's tokens through expert parallel, the whole batch in one process
    x = get_batch(data.train, cfg.batch_size, config.block_size, 0, cfg.seed)[0]
    router = router_parity(expert_parallel(fresh_model(config), groups), fresh_model(config), x, groups)
    print0(f"\nrouter logits vs one process: max |diff| {router['router_logits']:.1e}; "
           f"top-{config.moe_top_k} choices that differ: {router['choices_differ']}")

    # training: one process vs expert parallel, without and with dropping
    runs, diffs, refs = {}, {}, {}
    for name, model_cfg in (("no drop", config), (f"capacity {args.capacity_factor}", dropping)):
        refs[name] = reference_run(model_cfg, data, cfg, first_grads=True)
        runs[name] = run_expert_parallel(model_cfg, data, cfg, pcfg)
        diffs[name] = worst_diffs(runs[name], refs[name], subset=True)
    print0("\n" + losses_table(refs["no drop"].losses, {n: r.losses for n, r in runs.items()}))
    print0(parity_table(diffs, tol={"loss": TOL, "grad": TOL, "param": PARAM_TOL}) + "\n(parameters after "
           "the AdamW steps: AdamW moves a weight by about lr·g/(|g| + 1e-8), so rounding in a gradient near "
           "1e-8 shows as ~1e-5)")
    for name, run in runs.items():
        print0(f"\n{name}: every step, the whole batch's routing, rank 0's all-to-alls (ledger vs formula)")
        print0(table(ep_rows(run), STEP_COLUMNS))
    print0("\nthe last step's collectives on rank 0, by group (ledger vs formula):")
    print0(ledger_table({name: (run.comm[g], run.analytic.get(g, {})) for name, run in runs.items()
                         for g in run.comm}))
    ledger_ok = all(r.details["ledger_matches"] for r in runs.values())
    print0(f"every collective of every step on every rank equals its formula: {'yes' if ledger_ok else 'NO'}")

    # memory: this rank's parameters and AdamW state, measured vs the estimator
    run = runs["no drop"]
    est = estimate_memory(config, batch_size=cfg.batch_size, seq_len=config.block_size, dp=pcfg.dp, ep=ep,
                          device="cpu")
    counters = 4 * param_tensor_count(config, ep)  # AdamW's fp32 step counter per tensor, in the estimate
    experts = expert_param_count(config, ep) * 4
    memory = {"parameters": (run.state_bytes["params"], est.params),
              "AdamW moments": (run.state_bytes["optimizer"], est.optimizer - counters),
              "expert parameters": (run.state_bytes["expert_params"], experts),
              "expert AdamW moments": (run.state_bytes["expert_optimizer"], 2 * experts)}
    print0("\nthis rank's model states (rank 0; fp32 AdamW):")
    print0(bytes_table({"rank 0": memory}))

    # load balance: the same training with and without the balancing loss
    balance = {}
    for coef in (0.0, config.moe_aux_coef):
        r = run_expert_parallel(config.with_(moe_aux_coef=coef), data, balance_cfg, pcfg)
        balance[f"aux {coef:g}"] = [s["imbalance"] for s in r.details["routing"]]
    every = max(1, args.balance_steps // 6)
    shown = sorted(set(range(0, args.balance_steps, every)) | {args.balance_steps - 1})
    print0(f"\nload imbalance (max/mean pairs per expert, mean over layers; 1 is even, E/k = "
           f"{E / config.moe_top_k:g} one expert per layer) over {args.balance_steps} steps, "
           f"lr {args.balance_lr:g}:")
    print0(table([{"step": s, **{k: v[s] for k, v in balance.items()}} for s in shown],
                 [("step", "step", str), *((k, k, fixed(2)) for k in balance)]))

    result = {"preset": args.preset, "config": config.to_dict(), "pcfg": {"dp": pcfg.dp, "ep": ep},
              "train": cfg.to_dict(), "params": {"total": total, "active": active,
                                                 "per_rank": param_count(config, ep=ep),
                                                 "experts_per_rank": expert_param_count(config, ep)},
              "router": router, "parity": diffs, "tolerance": {"loss_grad_router": TOL, "param": PARAM_TOL},
              "runs": {name: {"losses": r.losses, "reference_losses": refs[name].losses,
                              "routing": r.details["routing"], "steps": r.details["steps"],
                              "ledger_matches": r.details["ledger_matches"]} for name, r in runs.items()},
              "memory": {k: {"measured": m, "estimated": e} for k, (m, e) in memory.items()},
              "balance": balance, "balance_train": balance_cfg.to_dict()}
    path = save_json(LAB, "result", result)
    print0(f"\nwrote {path}")
    return {"parity": diffs, "ledger_matches": ledger_ok}


# %% Launch: under torchrun this process is one rank; under python it spawns --ranks ranks
if __name__ == "__main__":
    launch(rank_main, world, data)
