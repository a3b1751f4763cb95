"""Slow: the labs no other test runs end to end, started as a learner starts them, each checked
on the claims it prints (read back from its JSON). Tiny settings keep each to seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from journey_dist.config import PIPELINE_SCHEDULES
from journey_dist.parallel.pipeline.orders import inflight_formula
from tests.labs import ROOT, assert_lab03_claims, run_lab

pytestmark = pytest.mark.slow
TOL = 1e-5  # fp32 parity with one process, tiny config, a few AdamW steps


def test_lab01_trains_and_samples(tmp_path):
    out, r = run_lab("01_single_device", "--preset", "tiny", "--steps", "40", "--positions-steps", "10",
                     runs_dir=tmp_path)
    assert r["last_loss"] < r["first_loss"] - 0.5 and r["val_loss"] < r["first_loss"]
    assert r["sample"] and "shape" in out.lower()
    pos = json.loads((tmp_path / "01_single_device" / "positions.json").read_text())
    assert [row["positions"] for row in pos["rows"]] == ["learned", "sinusoidal", "rope", "alibi"]
    demo = pos["rope_demo"]
    assert abs(demo["dot"] - demo["dot_shifted"]) < 1e-4 and f"{demo['dot']:.4f}" in out


@pytest.mark.parametrize("torchrun", [0, 2], ids=["python", "torchrun"])
def test_lab03_tensor_parallel_claims(tmp_path, torchrun):
    args = ("--preset", "tiny", "--steps", "3", "--batch-size", "8", "--new-tokens", "8")
    _, r = run_lab("03_tensor_parallel", *args, runs_dir=tmp_path, torchrun=torchrun)
    assert_lab03_claims(r)  # shared with the notebook test


@pytest.mark.parametrize("torchrun", [0, 2], ids=["python", "torchrun"])
def test_lab03_runs_the_llama_family(tmp_path, torchrun):
    # the flagship on llama-mini: GQA (2 kv heads, one per rank), SwiGLU, RoPE, RMSNorm, untied head
    args = ("--preset", "llama-mini", "--steps", "2", "--batch-size", "8", "--new-tokens", "8")
    out, r = run_lab("03_tensor_parallel", *args, runs_dir=tmp_path, torchrun=torchrun)
    assert r["config"]["n_kv_head"] == 2 and "2 of 4 heads per rank (1 of 2 kv heads)" in out
    assert_lab03_claims(r, param_tol=1e-4)  # measured 3e-5 after 3 steps, the floor 2e-5
    assert r["generate"]["heads_per_rank"] == 1  # each rank caches its one kv head


def test_lab03_rejects_a_tp_that_splits_a_kv_head_before_spawning(tmp_path):
    lab = str(ROOT / "labs" / "03_tensor_parallel.py")
    out = subprocess.run([sys.executable, lab, "--preset", "llama-mini", "--ranks", "4"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "JOURNEY_RUNS_DIR": str(tmp_path)})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: tp=4 does not divide n_kv_head=2" in out.stderr and "use a tp in [1, 2]" in out.stderr


def test_lab04_pipeline_claims(tmp_path):
    # gpt-mini: 4 layers, so 2 stages x 2 chunks for the interleaved schedule
    args = ("--steps", "2", "--batch-size", "8", "--microbatches", "4", "--sweep", "2,4", "--sleep-ms", "15")
    _, r = run_lab("04_pipeline_parallel", *args, runs_dir=tmp_path)
    assert set(r["parity"]) == {prefix + s for prefix in ("", "torch ") for s in PIPELINE_SCHEDULES}
    for name, diffs in r["parity"].items():
        assert max(diffs.values()) < TOL, name
    for s in PIPELINE_SCHEDULES:  # held while the GPT trained, as the schedule's formula says
        v = r["virtual_stages"][s]
        assert r["peak_inflight_gpt"][s] == [inflight_formula(s, 2, 4, k, v) for k in range(2)], s
    assert [(row["schedule"], row["m"]) for row in r["bubble"]] == [
        (s, m) for s in PIPELINE_SCHEDULES for m in (2, 4) if not (s in ("1f1b", "zb-h1") and m < 2)]
    for row in r["bubble"]:  # sleeping stages: measured idle fraction near the schedule's formula
        assert abs(row["measured"] - row["formula"]) < 0.1, row
        assert row["peak_inflight"] == row["inflight_formula"], row


def test_lab07_memory_claims(tmp_path):
    _, r = run_lab("07_memory_profile", "--preset", "tiny", "--batch", "4", "--seq", "32",
                   runs_dir=tmp_path)
    rows = {row["component"]: row for row in r["rows"]}
    for exact in ("params", "grads", "optimizer"):  # model states: exact on CPU
        assert rows[exact]["measured"] == rows[exact]["estimated"], rows[exact]
    peak = [row for name, row in rows.items() if "peak" in name or "total" in name]
    assert peak and all(abs(row["error_pct"]) < 5 for row in peak), peak
    rc = r["recompute"]  # each mode measured; none, selective and full next to the estimate
    for mode in ("none", "selective", "full"):
        assert rc[mode]["states_exact"], mode
        assert abs(rc[mode]["peak_estimated"] / rc[mode]["peak_measured"] - 1) < 0.05, mode
    assert rc["selective"]["activations_measured"] == rc["selective"]["activations_estimated"]
    assert rc["full"]["peak_measured"] < rc["selective"]["peak_measured"] <= rc["none"]["peak_measured"]
    assert rc["full"]["extra_flops"] > rc["selective"]["extra_flops"] > 0 == rc["ops"]["extra_flops"]


def test_lab11_context_parallel_claims(tmp_path):
    _, r = run_lab("11_context_parallel", "--preset", "tiny", "--seq", "32", "--steps", "2",
                   "--batch-size", "4", "--repeats", "1", runs_dir=tmp_path)
    assert r["cp"] == 2 and set(r["parity"]["diffs"]) == {"ring", "zigzag", "ulysses"}
    for design, d in r["parity"]["diffs"].items():
        assert max(d["loss"], d["logits"], d["grad"]) < TOL, design
    assert r["traffic"]["match"]
    for design, m in r["memory"]["per_design"].items():
        assert m["activations"] == m["estimated_activations"], design
    flops = {k: v["flops"] for k, v in r["balance"]["imbalance"].items()}
    assert flops == {"plain": pytest.approx(4 / 3), "zigzag": 1.0}
    assert all(not a["ran"] or a["max_diff"] < TOL for a in r["torch_context_parallel"].values())


@pytest.mark.parametrize("preset,blocks", [("tiny", "8"), ("llama-mini", "24")])  # llama: RoPE, GQA
def test_lab13_serving_claims(tmp_path, preset, blocks):
    # blocks of 16 tokens: room for a few context windows (32 tokens tiny, 128 llama-mini) at once
    args = ("--preset", preset, "--requests", "12", "--blocks", blocks, "--max-seqs", "8",
            "--train-steps", "3",
            "--group-size", "16")
    _, r = run_lab("13_serving", *args, runs_dir=tmp_path)
    runs = r["batching"]
    assert len(runs) == 3 and all(v["identical"] for v in runs.values())  # = one request at a time
    static, *continuous = runs.values()
    assert static["mixed_steps"] == 0 and all(c["mixed_steps"] > 0 for c in continuous)
    assert all(c["kv_used_over_reserved"] > static["kv_used_over_reserved"] for c in continuous)
    q = r["quantization"]["rows"]
    for name, row in q.items():  # ours and torchao's (if installed), each against its layout's formula
        assert row["weight_bytes"] == row["formula_bytes"], name
    assert q["int4-g16"]["weight_bytes"] < q["int8"]["weight_bytes"] < q["fp32"]["weight_bytes"]
    for a in r["quantization"]["agreement"].values():  # torchao installed: codes within one step of ours
        assert a["max_code_diff"] <= 1
    assert len(r["tp"]) == 2
    for rank in r["tp"]:
        assert rank["greedy_identical"] and rank["weight_bytes"] == rank["weight_bytes_formula"]
        per_rank = rank["cache_bytes_per_rank"]
        assert per_rank == rank["cache_bytes_formula"] == rank["cache_bytes_one_process"] // 2


def test_lab12_mixture_of_experts_claims(tmp_path):
    args = ("--steps", "2", "--batch-size", "4", "--balance-steps", "20")
    _, r = run_lab("12_mixture_of_experts", *args, runs_dir=tmp_path)
    tol = r["tolerance"]
    assert r["router"]["router_logits"] < tol["loss_grad_router"] and r["router"]["choices_differ"] == 0
    for name, d in r["parity"].items():  # without and with dropping
        assert d["loss"] < tol["loss_grad_router"] and d["grad"] < tol["loss_grad_router"], name
        assert d["param"] < tol["param"], name
    assert all(run["ledger_matches"] for run in r["runs"].values())
    assert sum(s["dropped"] for s in r["runs"]["capacity 1.0"]["routing"]) > 0
    assert all(row["measured"] == row["estimated"] for row in r["memory"].values())
    off, on = r["balance"].values()  # without, then with the balancing loss: it evens the load out
    assert on[-1] < off[-1] - 0.5 and on[-1] < max(on)

