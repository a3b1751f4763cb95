"""3D parallel (dp x tp x pp on one mesh) equals one process.

Tolerance: 1e-5 (fp32, tiny config) on every step's loss, every first-step gradient and every
parameter after 3 AdamW steps, each rank's slice compared with the single-process tensors cut the
same way. What remains is float rounding of per-microbatch and per-shard sums.
"""

import pytest
import torch.distributed as dist

from journey_dist.comm import CommLedger
from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.mesh import all_groups, build_mesh, layout_text
from journey_dist.parallel.pipeline_parallel import single_process_run
from journey_dist.parallel.three_d import check_3d, comm_by_dim, grad_bytes, parity, three_d_run
from journey_dist.train import TrainConfig
from tests.dist import run_ranks

TOL = 1e-5
TINY = get_preset("tiny", block_size=16)
CFG = TrainConfig(steps=3, batch_size=8, grad_accum=2, warmup_steps=1, eval_batches=1)


# ----------------------------------------------------------------------------- no processes


def test_layout_names_every_group():
    pcfg = ParallelConfig(dp=2, tp=2, pp=2)
    assert all_groups("tp", pcfg) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all_groups("dp", pcfg) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert all_groups("pp", pcfg) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    text = layout_text(pcfg)
    assert "pp stage 1: dp0: [4, 5]   dp1: [6, 7]" in text
    assert "pp groups" in text and "[[0, 4], [1, 5], [2, 6], [3, 7]]" in text
    assert all_groups("dp", ParallelConfig(dp=2, pp=2)) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("pcfg, message", [
    (ParallelConfig(dp=2, pp=2, microbatches=2, zero=2), r"zero=2 with pp=2 is not supported"),
    (ParallelConfig(dp=2, pp=2, microbatches=2, zero=1), r"zero=1: the 3D run keeps full optimizer"),
    (ParallelConfig(tp=2, pp=2, microbatches=2, sequence_parallel=True),
     r"sequence_parallel is not supported by the 3D run"),
    (ParallelConfig(dp=2, tp=2, pp=2, microbatches=2), r"dp\*tp\*pp = 2\*2\*2 = 8 but the world has 4"),
    (ParallelConfig(dp=2, pp=3, microbatches=3), r"pp=3 is larger than n_layer=2"),
])
def test_3d_config_errors(pcfg, message):
    with pytest.raises(ConfigError, match=message):
        check_3d(pcfg, TINY, world_size=pcfg.world_size if "world" not in message else 4, global_batch=12)


# ----------------------------------------------------------------------------- on ranks


def _three_d_rank(pcfg, config, cfg, ref):
    mesh = build_mesh(pcfg)
    with CommLedger() as ledger:
        run, pipe = three_d_run(config, load_tokens("handbook"), cfg, mesh)
    return {"coords": mesh.coords, "parity": parity(run, ref, config, mesh), "losses": run.losses,
            "ref_losses": ref.losses, "comm": comm_by_dim(ledger, mesh), "grad_bytes": grad_bytes(pipe.stage),
            "world": dist.get_world_size()}


def check_parity(pcfg, results, cfg=CFG):
    for r in results:
        assert r["parity"]["loss"] < TOL and r["parity"]["grad"] < TOL and r["parity"]["param"] < TOL, r
        assert len(r["losses"]) == cfg.steps
        assert r["losses"][-1] < r["losses"][0]  # it trains
        comm = r["comm"]
        if pcfg.dp > 1:  # per step: every gradient byte of this rank's slice once, plus the logged loss
            assert comm["dp"]["all_reduce"]["bytes"] == cfg.steps * (r["grad_bytes"] + 4)
        if pcfg.pp > 1:
            assert comm["pp"]["send"]["calls"] > 0
        if pcfg.tp > 1:
            assert comm["tp"]["all_reduce"]["calls"] > 0


def _meshes_rank(pcfgs, config, cfg, ref):
    return [_three_d_rank(pcfg, config, cfg, ref) for pcfg in pcfgs]  # one spawn: start-up dominates


def reference(config=TINY, cfg=CFG):
    """The single-process run, once, in the test process (every rank gets a copy)."""
    return single_process_run(config, load_tokens("handbook"), cfg)


def test_3d_on_4_ranks_matches_single_process():
    pcfgs = [ParallelConfig(dp=2, tp=1, pp=2, microbatches=CFG.grad_accum),
             ParallelConfig(dp=1, tp=2, pp=2, microbatches=CFG.grad_accum)]
    per_rank = run_ranks(_meshes_rank, 4, pcfgs, TINY, CFG, reference())
    for i, pcfg in enumerate(pcfgs):
        check_parity(pcfg, [results[i] for results in per_rank])


@pytest.mark.slow
def test_3d_2x2x2_on_8_ranks_matches_single_process():
    pcfg = ParallelConfig(dp=2, tp=2, pp=2, microbatches=CFG.grad_accum)
    check_parity(pcfg, run_ranks(_three_d_rank, 8, pcfg, TINY, CFG, reference(), timeout_s=300))
