"""Slow: DeepSpeed ZeRO stages 1-3 vs DDP on 2 CPU ranks, and the accelerate / lab launch paths.

DeepSpeed runs fp32 on CPU with the client torch AdamW, averages gradients over the ranks
(sum x 1/N), scales the loss by 1/gradient_accumulation_steps and clips by the global norm,
so after 3 steps its losses equal DDP's within LOSS_TOL (measured 0.0) and its weights within
PARAM_TOL (measured <= 1e-6: the norm for clipping is summed in a different order). AdamW's update
m/sqrt(v) does not change when every gradient is scaled by a constant, and clipping rescales too,
so losses and weights alone would not notice a wrong 1/N or 1/grad_accum: the first step's global
gradient norm (what DeepSpeed clips by) must also equal DDP's within NORM_RTOL (measured 4e-8).
The Llama family (tests/families.py) runs every stage too.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from journey_dist.config import get_preset
from journey_dist.data import load_tokens
from journey_dist.parallel.data.replicas import run_data_parallel
from journey_dist.parallel.sharding.deepspeed import STAGES, run_deepspeed
from journey_dist.parity import max_abs_diff
from journey_dist.runtime import find_free_port
from journey_dist.train import TrainConfig
from tests.dist import run_ranks
from tests.families import tiny

pytestmark = pytest.mark.slow
LOSS_TOL = 1e-5
PARAM_TOL = 1e-5
NORM_RTOL = 1e-6
CFG = TrainConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=1, grad_clip=1.0, seed=0)
ROOT = Path(__file__).resolve().parents[1]


def _norm_rel_diff(ds_norm: float | None, ddp_grads: dict[str, torch.Tensor]) -> float:
    ref = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ddp_grads.values()]))
    return float("inf") if ds_norm is None else abs(ds_norm - ref.item()) / ref.item()


def _stages_vs_ddp() -> dict:
    config, data = get_preset("tiny"), load_tokens("handbook")
    ddp = run_data_parallel("ddp", config, data, CFG)
    out = {}
    for stage in STAGES:
        run = run_deepspeed(stage, config, data, CFG)
        out[stage] = {"loss": max(abs(a - b) for a, b in zip(run.losses, ddp.losses)),
                      "params": max_abs_diff(run.params, ddp.params), "state": run.state_bytes,
                      "steps": len(run.losses), "grad_norm": _norm_rel_diff(run.grad_norm, ddp.grads)}
    accum = replace(CFG, grad_accum=2)  # engine.backward scales by 1/2 itself: pass the raw loss
    ddp2, ds2 = run_data_parallel("ddp", config, data, accum), run_deepspeed(2, config, data, accum)
    out["accum"] = {"loss": max(abs(a - b) for a, b in zip(ds2.losses, ddp2.losses)),
                    "params": max_abs_diff(ds2.params, ddp2.params), "steps": len(ds2.losses),
                    "grad_norm": _norm_rel_diff(ds2.grad_norm, ddp2.grads)}
    out["n"] = sum(p.numel() for p in ddp.params.values())  # named_parameters: the tied matrix once
    llama = tiny("llama")
    ddp = run_data_parallel("ddp", llama, data, CFG)
    for stage in STAGES:
        run = run_deepspeed(stage, llama, data, CFG)
        out["llama", stage] = {"loss": max(abs(a - b) for a, b in zip(run.losses, ddp.losses)),
                               "params": max_abs_diff(run.params, ddp.params), "steps": len(run.losses),
                               "grad_norm": _norm_rel_diff(run.grad_norm, ddp.grads)}
    return out


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return run_ranks(_stages_vs_ddp, 2, timeout_s=600)


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_stage_loss_equals_ddp_after_3_steps(stages, stage):
    for rank in stages:
        r = rank[stage]
        assert r["steps"] == 3 and r["loss"] <= LOSS_TOL and r["params"] <= PARAM_TOL, r
        assert r["grad_norm"] <= NORM_RTOL, r  # the gradients themselves, not only AdamW's view of them


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_stage_runs_the_llama_family_as_ddp(stages, stage):
    for rank in stages:
        r = rank["llama", stage]
        assert r["steps"] == 3 and r["loss"] <= LOSS_TOL and r["params"] <= PARAM_TOL, r
        assert r["grad_norm"] <= NORM_RTOL, r


def test_deepspeed_gradient_accumulation_equals_ddp(stages):
    for rank in stages:
        r = rank["accum"]
        assert r["steps"] == 3 and r["loss"] <= LOSS_TOL and r["params"] <= PARAM_TOL, r
        assert r["grad_norm"] <= NORM_RTOL, r


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_shards_what_its_stage_says(stages, stage):
    n = stages[0]["n"]
    state = stages[0][stage]["state"]
    assert state["optimizer"] == 8 * n // 2  # moments: always sharded (tiny: no padding)
    assert state["params"] == (4 * n // 2 if stage == 3 else 4 * n)
    assert state["grads_full"] == 0  # after the boundary backward only partitions remain
    assert state["grads_partition"] < 4 * n  # reduced gradients kept as this rank's partition


def _run(cmd: list[str], tmp_path: Path, **extra_env: str) -> dict:
    env = {**os.environ, "JOURNEY_RUNS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), **extra_env}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads((tmp_path / "06_zero_and_fsdp" / "result.json").read_text())


LAB = [str(ROOT / "labs" / "06_zero_and_fsdp.py"), "--preset", "tiny", "--steps", "2", "--batch-size", "8"]


def test_accelerate_launch_runs_two_cpu_ranks(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"),
           "--main_process_port", str(find_free_port()), *LAB, "--skip-deepspeed"]
    result = _run(cmd, tmp_path, ACCELERATE_USE_CPU="1")
    # the launcher started both ranks (a one-process launch would fall back to the lab's own spawn)
    assert result["launcher"] == "torchrun"
    assert result["world_size"] == 2 and result["accelerate_processes"] == 2
    assert set(result["schemes"]) == {"ddp", "zero1 (ours)", "fsdp2 (zero-3)", "accelerate (ddp)"}
    for row in result["schemes"].values():
        assert row["loss_diff"] <= LOSS_TOL and row["param_diff"] <= PARAM_TOL, row


def test_lab_with_deepspeed_under_python(tmp_path):
    result = _run([sys.executable, *LAB], tmp_path)
    assert result["world_size"] == 2 and {f"deepspeed zero-{s}" for s in STAGES} <= set(result["schemes"])
    for row in result["schemes"].values():
        assert row["loss_diff"] <= result["tolerance"] and row["param_diff"] <= result["tolerance"], row
        # first-step gradients too (AdamW hides a gradient scale): every scheme here records them
        assert row["grad_check"] in ("max|g|", "rel norm") and row["grad_diff"] <= 1e-6, row
    zero1 = result["schemes"]["zero1 (ours)"]
    for op in ("reduce_scatter", "all_gather", "all_reduce"):
        assert zero1["comm"][op]["bytes"] == zero1["analytic"][op]["bytes"], op
