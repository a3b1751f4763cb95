"""Slow: the labs no other test runs end to end, started as a learner starts them, each checked
on the claims it prints (read back from its JSON). Tiny settings keep each to seconds."""

from __future__ import annotations

import json

import pytest

from tests.labs import assert_lab03_claims, run_lab

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


def test_lab04_pipeline_claims(tmp_path):
    args = ("--preset", "tiny", "--steps", "3", "--batch-size", "8", "--microbatches", "4",
            "--sweep", "1,4", "--sleep-ms", "15")
    _, r = run_lab("04_pipeline_parallel", *args, runs_dir=tmp_path)
    for name, diffs in r["parity"].items():
        assert max(diffs.values()) < TOL, name
    assert r["peak_inflight_gpt"]["gpipe"] == [4, 4] and max(r["peak_inflight_gpt"]["1f1b"]) <= 2
    for row in r["bubble"]:  # sleeping stages: measured idle fraction near (p-1)/(m+p-1)
        assert abs(row["measured"] - row["formula"]) < 0.08, row


def test_lab07_memory_claims(tmp_path):
    _, r = run_lab("07_memory_profile", "--preset", "tiny", "--batch", "4", "--seq", "32",
                   runs_dir=tmp_path)
    rows = {row["component"]: row for row in r["rows"]}
    for exact in ("params", "grads", "optimizer"):  # model states: exact on CPU
        assert rows[exact]["measured"] == rows[exact]["estimated"], rows[exact]
    peak = [row for name, row in rows.items() if "peak" in name or "total" in name]
    assert peak and all(abs(row["error_pct"]) < 5 for row in peak), peak


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


def test_lab13_serving_claims(tmp_path):
    args = ("--preset", "tiny", "--requests", "12", "--blocks", "8", "--max-seqs", "8", "--train-steps", "3",
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
