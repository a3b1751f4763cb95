"""3D parallel (dp x tp x pp on one mesh) equals one process.

Tolerance: 1e-5 (fp32, tiny config) on every step's loss, every first-step gradient and every
parameter after 3 AdamW steps, each rank's slice compared with the single-process tensors cut the
same way. What remains is float rounding of per-microbatch and per-shard sums. The Llama family
(tests/families.py: GQA split by kv heads, SwiGLU, RoPE, untied head) runs tp x pp and dp x tp.
"""

from dataclasses import replace

import pytest
import torch

from journey_dist.comm import CommLedger
from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.mesh import all_groups, build_mesh, layout_text
from journey_dist.model import GPT
from journey_dist.parallel.compose import (
    check_3d,
    comm_by_dim,
    expected_comm_per_step,
    grad_bytes,
    parity,
    three_d_run,
)
from journey_dist.parallel.pipeline.stage import GPTStage
from journey_dist.parity import reference_run
from journey_dist.train import TrainConfig
from tests.dist import run_ranks
from tests.families import tiny
from tests.labs import run_lab

TOL = 1e-5
TINY = get_preset("tiny", block_size=16)
LLAMA = tiny("llama", block_size=16)
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


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"bias": False}, {"n_layer": 5},
                                       "llama"])
@pytest.mark.parametrize("pp", [1, 2, 3])
def test_expected_dp_bytes_are_the_stage_parameters(overrides, pp):
    # The dp all-reduce of a step hands over each stage's parameters (the tied copy on the last).
    config = LLAMA.with_(n_layer=3) if overrides == "llama" else TINY.with_(**{"n_layer": 3, **overrides})
    model = GPT(config)
    pcfg = ParallelConfig(dp=2, pp=pp, microbatches=pp)
    for s in range(pp):
        stage = GPTStage(model, s, pp)
        expected = expected_comm_per_step(config, pcfg, CFG, {"pp": s, "dp": 0, "tp": 0})
        assert expected["dp"]["all_reduce"] == grad_bytes(stage), (s, overrides)


# ----------------------------------------------------------------------------- on ranks


def _three_d_rank(pcfg, config, cfg, ref):
    mesh = build_mesh(pcfg)
    ledger = CommLedger()  # training steps only
    run, pipe = three_d_run(config, load_tokens("handbook"), cfg, mesh, ledger=ledger)
    return {"coords": mesh.coords, "parity": parity(run, ref, config, mesh), "losses": run.losses,
            "ref_losses": ref.losses, "comm": comm_by_dim(ledger, mesh), "grad_bytes": grad_bytes(pipe.stage),
            "expected": expected_comm_per_step(config, pcfg, cfg, mesh.coords)}


def check_parity(pcfg, results, cfg=CFG):
    for r in results:
        assert r["parity"]["loss"] < TOL and r["parity"]["grad"] < TOL and r["parity"]["param"] < TOL, r
        assert len(r["losses"]) == cfg.steps
        assert r["losses"][-1] < r["losses"][0]  # it trains
        # the ledger of the training steps equals the analytic bytes per step, every kind, every rank
        measured = {dim: {op: row["bytes"] / cfg.steps for op, row in ops.items() if op in r["expected"][dim]}
                    for dim, ops in r["comm"].items() if dim in r["expected"]}
        assert measured == r["expected"], (r["coords"], measured, r["expected"])
        # what the comparison above leaves out may only be the pipeline's control messages (the
        # schedule all-gather, 128 B, and the loss broadcast, 4 B, per step) and the recv side of
        # each send: a stray collective on any group fails here instead of being filtered away
        for dim, ops in r["comm"].items():
            for op, row in ops.items():
                where = (r["coords"], dim, op, row)
                if op not in r["expected"].get(dim, {}):
                    assert dim == "pp" and op in ("recv", "all_gather", "broadcast"), where
                    assert op == "recv" or row["bytes"] / cfg.steps <= 256, where
        if pcfg.dp > 1:  # every gradient byte of this rank's slice, once per step
            assert r["expected"]["dp"]["all_reduce"] == r["grad_bytes"]


def _cases_rank(cases, cfg):
    """Several (pcfg, config, ref) runs in one spawn: process start-up dominates on a small box."""
    return [_three_d_rank(pcfg, config, cfg, ref) for pcfg, config, ref in cases]


def reference(config=TINY, cfg=CFG):
    """The single-process run, once, in the test process (every rank gets a copy)."""
    return reference_run(config, load_tokens("handbook"), cfg, first_grads=True)


def run_cases(world, cases, timeout_s=120.0):
    per_rank = run_ranks(_cases_rank, world, cases, CFG, timeout_s=timeout_s)
    for i, (pcfg, _, _) in enumerate(cases):
        check_parity(pcfg, [results[i] for results in per_rank])


def test_3d_on_4_ranks_matches_single_process():
    ref, llama = reference(), reference(LLAMA)
    run_cases(4, [(ParallelConfig(dp=2, tp=1, pp=2, microbatches=2), TINY, ref),
                  (ParallelConfig(dp=1, tp=2, pp=2, microbatches=2), TINY, ref),
                  (ParallelConfig(dp=1, tp=2, pp=2, microbatches=2), LLAMA, llama),
                  (ParallelConfig(dp=2, tp=2, pp=1, microbatches=2), LLAMA, llama)])


def _dropout_rank(pcfg, config, cfg):
    mesh = build_mesh(pcfg)
    run, _ = three_d_run(config, load_tokens("handbook"), cfg, mesh)
    return {"coords": mesh.coords, "losses": run.losses,
            "params": {k: v for k, v in run.params.items() if "ln_" in k}}  # replicated over tp


def test_3d_with_dropout_keeps_tp_replicas_in_step():
    """Dropout under tp: replicated regions draw the same masks on every tp rank (else the
    LayerNorm weights, which each tp rank holds whole, would drift apart)."""
    pcfg = ParallelConfig(dp=1, tp=2, pp=2, microbatches=2)
    config = TINY.with_(dropout=0.1)
    cfg = replace(CFG, steps=2)
    results = run_ranks(_dropout_rank, 4, pcfg, config, cfg, timeout_s=120.0)
    for stage in (0, 1):
        a, b = [r for r in results if r["coords"]["pp"] == stage]
        assert a["params"] and a["params"].keys() == b["params"].keys()
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), (stage, name)
    assert results[0]["losses"] == results[-1]["losses"]


@pytest.mark.slow
def test_3d_2x2x2_on_8_ranks_matches_single_process():
    # also: GPipe, and a vocabulary of 255 padded to 256 over tp=2 (padded logits masked)
    odd = TINY.with_(vocab_size=255)
    run_cases(8, [(ParallelConfig(dp=2, tp=2, pp=2, microbatches=2), TINY, reference()),
                  (ParallelConfig(dp=2, tp=2, pp=2, microbatches=2, schedule="gpipe", pad_vocab=True),
                   odd, reference(odd))], timeout_s=400)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_lab_runs_both_ways(tmp_path, launcher):
    lab_args = ("--dp", "1", "--tp", "2", "--pp", "2", "--preset", "tiny", "--steps", "3",
                "--batch-size", "8", "--microbatches", "2")
    out, result = run_lab("05_3d_parallel", *lab_args, runs_dir=tmp_path,
                          torchrun=4 if launcher == "torchrun" else 0, timeout_s=300)
    assert "tp groups (" in out and "[[0, 1], [2, 3]]" in out
    assert max(result["parity"].values()) < TOL and result["comm_matches_expected"]
    assert len(result["comm_per_step"]) == 4


@pytest.mark.slow
def test_lab_rejects_a_bad_mesh_before_spawning():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "labs" / "05_3d_parallel.py"), "--tp", "3"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 2 and "05_3d_parallel.py: error: tp=3 does not divide n_head=4" in out.stderr
    assert "Traceback" not in out.stderr
