"""FSDP2 + TP on a 2-D DeviceMesh (and HSDP as the dp dimension) on 4 gloo ranks.

Parity with one process (the same tolerances as FSDP2 alone, tests/test_zero.py): losses and
parameters within 1e-5, first-step gradients within 1e-6. Per-rank bytes of weights, gradients and
AdamW moments equal memory.estimate's model states with dp, zero=3 and tp (tiny: every dim 0
divides, so no padding). FSDP2's all-gathers and reduce-scatters on the dp group equal the
count derived from the tp shards (fsdp_tp.tp_unit_bytes).
"""

import pytest
import torch.distributed as dist

from journey_dist.config import ConfigError, get_preset
from journey_dist.data import load_tokens
from journey_dist.memory.estimate import estimate_memory
from journey_dist.parallel.sharding.fsdp_tp import check_layout, run_fsdp_tp
from journey_dist.parity import reference_run, worst_diffs
from journey_dist.train import TrainConfig
from tests.dist import run_ranks

TOL = 1e-5
GRAD_TOL = 1e-6
CFG = TrainConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=1, grad_clip=1.0, seed=0)
TINY = get_preset("tiny")
LAYOUTS = {"fsdp2 x tp (2 x 2)": dict(dp=2, tp=2), "hsdp (2 x 2), tp=1": dict(dp=4, tp=1, replicate=2)}


def _both_layouts() -> dict:
    data = load_tokens("handbook")
    ref = reference_run(TINY, data, CFG, first_grads=True)
    out = {}
    for name, layout in LAYOUTS.items():
        run = run_fsdp_tp(TINY, data, CFG, **layout)
        out[name] = {"diffs": worst_diffs(run, ref), "state": run.state_bytes, "comm": run.comm,
                     "analytic": run.analytic, "placements": run.details["placements"]}
    out["rank"] = dist.get_rank()
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_both_layouts, 4, timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_2d_mesh_equals_one_process(results, name):
    for rank in results:
        d = rank[name]["diffs"]
        assert d["loss"] <= TOL and d["param"] <= TOL and d["grad"] is not None and d["grad"] <= GRAD_TOL, d


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_2d_mesh_bytes_per_rank_equal_the_estimate(results, name):
    layout = LAYOUTS[name]
    shard = layout["dp"] // layout.get("replicate", 1)  # HSDP shards over dp_shard only
    est = estimate_memory(TINY, batch_size=CFG.batch_size, seq_len=TINY.block_size, dp=shard,
                          tp=layout["tp"], zero=3)
    expected = {"params": est.params, "grads": est.grads, "optimizer": est.optimizer}
    for rank in results:
        assert rank[name]["state"] == {k: int(v) for k, v in expected.items()}, (rank["rank"], expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_2d_mesh_dp_collectives_equal_the_unit_count(results, name):
    for rank in results:
        comm, want = rank[name]["comm"]["dp"], rank[name]["analytic"]["dp"]
        for op in ("all_gather", "reduce_scatter"):
            assert (comm[op]["calls"], comm[op]["bytes"]) == (want[op]["calls"], want[op]["bytes"]), op


@pytest.mark.slow
def test_2d_placements_shard_over_dp_then_tp(results):
    placements = results[0]["fsdp2 x tp (2 x 2)"]["placements"]
    assert placements["transformer.h.0.mlp.c_proj.weight"] == ["S(0)", "S(1)"]  # dp rows, tp columns
    assert placements["transformer.h.0.mlp.c_fc.weight"] == ["_S(0, 2)", "S(0)"]  # both on dim 0
    assert placements["transformer.h.0.ln_1.weight"] == ["S(0)"]  # not in the tp plan: dp only


@pytest.mark.parametrize("world, dp, tp, replicate, match", [
    (4, 2, 1, 1, r"dp=2 x tp=1 = 2 ranks, but the world has 4"),
    (4, 4, 1, 3, r"replicate=3 must divide dp=4; use replicate in \[1, 2, 4\]"),
])
def test_bad_2d_layout_is_a_config_error(world, dp, tp, replicate, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(world, dp, tp, replicate)
