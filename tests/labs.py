"""Run a lab the way a learner does (plain python, or torchrun) and read the JSON it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_lab(name: str, *args: str, runs_dir: Path, torchrun: int = 0, timeout_s: float = 600,
            env: dict[str, str] | None = None) -> tuple[str, dict]:
    """Run labs/<name>.py with `args` (under torchrun with that many ranks if `torchrun`);
    return its stdout and runs/<name>/result.json. Fails with the lab's stderr if it exits non-zero."""
    lab = [str(ROOT / "labs" / f"{name}.py"), *args]
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", *lab] if torchrun
           else [sys.executable, *lab])
    full_env = {**os.environ, "JOURNEY_RUNS_DIR": str(runs_dir), "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    assert out.returncode == 0, f"{name} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout, json.loads((runs_dir / name / "result.json").read_text())


# The claims labs 02 and 03 print, checked on their JSON however they ran (python, torchrun, notebook).
TOL = 1e-5  # fp32 parity with one process, tiny config, a few AdamW steps


def assert_lab02_claims(r: dict) -> None:
    """DP on 2 ranks: every variant ends at the one-process parameters; ledger bytes = analytic."""
    assert r["world_size"] == 2 and set(r["variants"]) == {"naive", "bucketed", "ddp"}
    for row in r["variants"].values():
        assert row["param_diff"] < TOL and row["measured"]["bytes"] == row["analytic"]["bytes"]


def assert_lab03_claims(r: dict, param_tol: float = TOL) -> None:
    """TP: parity with one process, ledger = formula, per-rank bytes = estimate, TP generate.
    `param_tol`: parameters after the AdamW steps (a CPU-sized preset sits at ~3e-5, next to the
    rounding floor the lab prints; AdamW's first steps turn tiny gradient differences into full steps)."""
    assert set(r["variants"]) == {"tp", "tp+sp", "dtensor"}
    for name, v in r["variants"].items():
        assert max(v["loss_diff"], v["grad_diff"]) < TOL and v["param_diff"] < param_tol, name
        assert v["measured"] == v["analytic"], name  # the ledger equals the formula, every collective
    for name in ("tp", "tp+sp"):  # each rank holds exactly param_count(cfg, tp) parameters
        assert r["variants"][name]["param_bytes"] == r["param_bytes_estimate"], name
    g = r["generate"]
    assert g["greedy_identical"] and g["sampled_same_on_ranks"] and g["max_logit_diff"] < TOL
    assert g["cache_bytes_per_rank"] == g["cache_bytes_formula"] == g["cache_bytes_one_process"] // 2
