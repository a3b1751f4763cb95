"""Expert parallel equals one process: router logits, the loss of every step and every first-step
gradient within 1e-5 (fp32), without and with token dropping (the same pairs dropped: capacity and
queue order are the global batch's); the ledger's all-to-alls equal the formula for the step's
routing; each rank holds exactly the estimator's expert parameters and AdamW state.

Parameters after the AdamW steps are held to 1e-4: AdamW moves a weight by about lr·g/(|g| + eps),
which for a gradient element near eps = 1e-8 (an expert's sum of terms that cancel) turns a
rounding difference of 1e-10 into ~1e-5 of weight (measured: 2e-5 on dp=4, an expert's c_proj
element whose gradient is 2.2e-9 in one process and 2.3e-9 here; every gradient within 6e-8).

One 2-rank spawn (dp = ep = 2) runs in the default suite; ep = 4, ep inside a larger dp, and tp for
the dense parts are slow (4 ranks each).
"""

import pytest
import torch
import torch.distributed as dist

from journey_dist.comm import CommLedger
from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import get_batch, load_tokens
from journey_dist.memory.estimate import estimate_memory
from journey_dist.memory.sizes import expert_param_count, param_count, param_tensor_count
from journey_dist.mesh import build_mesh
from journey_dist.parallel.expert.dispatch import all_to_all
from journey_dist.parallel.expert.layer import expert_group_ranks
from journey_dist.parallel.expert.parallelize import (
    expert_groups_of,
    expert_parallel,
    router_parity,
    run_expert_parallel,
)
from journey_dist.parity import fresh_model, reference_run, worst_diffs
from journey_dist.train import TrainConfig
from tests.dist import run_ranks

TOL = 1e-5  # loss, router logits, first-step gradients
PARAM_TOL = 1e-4  # parameters after the AdamW steps (see the module docstring)
TINY_MOE = get_preset("moe-mini").with_(n_layer=2, n_embd=32, block_size=16, n_experts=4, moe_hidden=64)
CFG = TrainConfig(steps=2, batch_size=8, lr=3e-3, warmup_steps=1, grad_clip=1.0, eval_batches=1)
CONFIGS = {"no drop": TINY_MOE, "drop": TINY_MOE.with_(moe_capacity_factor=1.0)}


def _calls_bytes(comm: dict) -> dict:
    return {g: {op: (row["calls"], row["bytes"]) for op, row in ops.items()} for g, ops in comm.items()}


def _parity(pcfg: ParallelConfig, names: tuple[str, ...]) -> dict:
    data = load_tokens("handbook")
    out = {}
    for name in names:
        config = CONFIGS[name]
        mesh = build_mesh(pcfg)
        model = expert_parallel(fresh_model(config), expert_groups_of(mesh))
        x = get_batch(data.train, CFG.batch_size, config.block_size, 0)[0]
        router = router_parity(model, fresh_model(config), x, model.transformer.h[0].mlp.groups)
        ref = reference_run(config, data, CFG, first_grads=True)
        run = run_expert_parallel(config, data, CFG, pcfg)
        est = estimate_memory(config, batch_size=CFG.batch_size, seq_len=config.block_size, dp=pcfg.dp,
                              tp=pcfg.tp, ep=pcfg.ep, device="cpu")
        out[name] = {"diffs": worst_diffs(run, ref, subset=True), **router,
                     "dropped": sum(s["dropped"] for s in run.details["routing"]),
                     "measured": _calls_bytes(run.comm), "formula": _calls_bytes(run.analytic),
                     "ledger_matches": run.details["ledger_matches"],
                     "state": run.state_bytes, "estimate": {"params": est.params, "optimizer": est.optimizer}}
    return out


def _all_to_all_uneven() -> dict:
    """Rank 0 sends 1 row to itself and 3 to rank 1, rank 1 sends 2 and 2; the receiver weights its
    i-th row by i + 1 in the loss, so each sent row's gradient says where it went."""
    r = dist.get_rank()
    send = [[1, 3], [2, 2]]
    x = (torch.arange(4, dtype=torch.float32) + 10 * r).requires_grad_()
    with CommLedger() as ledger:
        got = all_to_all(x[:, None], [send[0][r], send[1][r]], send[r], None)
        (got.squeeze(1) * torch.arange(1, got.size(0) + 1)).sum().backward()
    return {"got": got.squeeze(1).tolist(), "grad": x.grad.tolist(),
            "bytes": ledger.total_bytes("all_to_all")}


def _dp2_ep2() -> dict:
    return {"parity": _parity(ParallelConfig(dp=2, ep=2), ("no drop", "drop")), "a2a": _all_to_all_uneven()}


@pytest.fixture(scope="module")
def dp2_ep2():
    return run_ranks(_dp2_ep2, 2, timeout_s=300)


def _check(results: list[dict], pcfg: ParallelConfig, names: tuple[str, ...]) -> None:
    for name in names:
        for rank, r in enumerate(results):
            row = r[name]
            assert row["router_logits"] < TOL and row["choices_differ"] == 0, (name, row)
            diffs = row["diffs"]
            assert diffs["loss"] < TOL and diffs["grad"] < TOL, (name, rank, diffs)
            assert diffs["param"] < PARAM_TOL, (name, rank, diffs)
            assert row["measured"] == row["formula"], (name, rank)  # the last step: calls and bytes
            assert row["ledger_matches"]  # every step, every rank
            config, state = CONFIGS[name], row["state"]
            assert state["expert_params"] == expert_param_count(config, pcfg.ep) * 4
            assert state["expert_optimizer"] == 2 * state["expert_params"]  # AdamW's two fp32 moments
            per_rank = param_count(config, pcfg.tp, ep=pcfg.ep) * 4
            assert state["params"] == per_rank == row["estimate"]["params"]
            counters = 4 * param_tensor_count(config, pcfg.ep)  # AdamW's step counters (CPU)
            assert state["optimizer"] + counters == row["estimate"]["optimizer"]
        if name == "drop":  # dropping happened (the same pairs as one process, by the parity above)
            assert results[0][name]["dropped"] > 0


def test_ep2_equals_one_process_without_and_with_dropping(dp2_ep2):
    _check([r["parity"] for r in dp2_ep2], ParallelConfig(dp=2, ep=2), ("no drop", "drop"))


def test_all_to_all_moves_uneven_rows_and_returns_their_gradients(dp2_ep2):
    r0, r1 = (r["a2a"] for r in dp2_ep2)
    assert r0["got"] == [0.0, 10.0, 11.0] and r1["got"] == [1.0, 2.0, 3.0, 12.0, 13.0]
    assert r0["grad"] == [1.0, 1.0, 2.0, 3.0] and r1["grad"] == [2.0, 3.0, 4.0, 5.0]
    # the ledger counts what each rank hands over: 4 rows forward; the gradients of the rows it got back
    assert r0["bytes"] == 4 * (4 + 3) and r1["bytes"] == 4 * (4 + 5)


def test_expert_groups_sit_inside_data_parallel():
    assert expert_group_ranks([0, 1, 2, 3], 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert expert_group_ranks([4, 6], 2) == ([[4, 6]], [[4], [6]])  # a tp=2 mesh's dp group


@pytest.mark.parametrize("pcfg,message", [
    (ParallelConfig(dp=4, ep=3), "ep=3 does not divide dp=4"),
    (ParallelConfig(dp=3, ep=3), "ep=3 does not divide n_experts=4"),
    (ParallelConfig(dp=2, ep=2, pp=2, microbatches=2), "pp=2 with a mixture of experts"),
])
def test_bad_expert_layouts_fail_before_any_rank(pcfg, message):
    with pytest.raises(ConfigError, match=message):
        pcfg.validate(TINY_MOE)


@pytest.mark.slow
@pytest.mark.parametrize("pcfg", [ParallelConfig(dp=4, ep=4), ParallelConfig(dp=4, ep=2),
                                  ParallelConfig(dp=2, tp=2, ep=2)],
                         ids=["dp4-ep4", "dp4-ep2", "dp2-tp2-ep2"])
def test_four_ranks_equal_one_process(pcfg):
    names = ("no drop", "drop")
    _check(run_ranks(_parity, 4, pcfg, names, timeout_s=600), pcfg, names)
