"""FSDP2 + TP on a 2-D DeviceMesh (and HSDP as the dp dimension) on 4 gloo ranks.

Parity with one process (the same tolerances as FSDP2 alone, tests/test_zero.py): losses and
parameters within 1e-5, first-step gradients within 1e-6. Per-rank bytes of weights, gradients and
AdamW moments equal memory.estimate's model states with dp, zero=3 and tp (tiny: every dim 0
divides, so no padding). One step's collectives on the dp and the tp groups equal their
count (fsdp_tp.run_fsdp_tp's analytic: units of tp shards, the clip's scalars, the TP plan).
"""

import json

import pytest
import torch.distributed as dist

from journey_dist.comm import calls_and_bytes
from journey_dist.config import ConfigError, get_preset
from journey_dist.data import load_tokens
from journey_dist.memory.estimate import estimate_memory
from journey_dist.parallel.sharding.fsdp_tp import check_layout, run_fsdp_tp
from journey_dist.parity import reference_run, worst_diffs
from journey_dist.train import TrainConfig
from tests.dist import run_ranks
from tests.labs import run_lab

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
def test_2d_mesh_collectives_equal_the_count(results, name):
    """dp: FSDP2's gathers and reduce-scatters per unit of tp shards, the clip's scalars (and HSDP's
    all-reduce of each gradient shard over dp_replicate); tp: the DTensor plan's activations, loss
    and clip (tensor/dtensor.py's count)."""
    for rank in results:
        for group in ("dp", "tp"):
            comm, want = rank[name]["comm"][group], rank[name]["analytic"][group]
            assert calls_and_bytes(comm) == calls_and_bytes(want), (group, comm, want)


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


@pytest.mark.slow
def test_lab06_mesh_2d_section(tmp_path):
    """Lab 06 spawns its own 4 ranks for the 2-D section and prints/writes what it measured."""
    out, _ = run_lab("06_zero_and_fsdp", "--preset", "tiny", "--steps", "2", "--batch-size", "8",
                     "--skip-deepspeed", runs_dir=tmp_path)
    r = json.loads((tmp_path / "06_zero_and_fsdp" / "mesh_2d.json").read_text())
    assert r["world_size"] == 4 and set(r["layouts"]) == {"fsdp2 x tp (2 x 2)", "hsdp (2 x 2) x tp 1"}
    for name, row in r["layouts"].items():
        assert max(v for v in row["diffs"].values() if v is not None) <= TOL, name
        assert row["state"] == {k: int(v) for k, v in row["estimate"].items()}, name
        assert name in out
    assert r["layouts"]["fsdp2 x tp (2 x 2)"]["mesh"] == [[0, 1], [2, 3]]  # tp fastest, as mesh.py
