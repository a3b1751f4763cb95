"""Slow: the labs no other test runs end to end, started as a learner starts them, each checked
on the claims it prints (read back from its JSON). Tiny settings keep each to seconds."""

from __future__ import annotations

import json

import pytest

from tests.labs import run_lab

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
    assert set(r["variants"]) == {"tp", "tp+sp", "dtensor"}
    for name, v in r["variants"].items():
        assert max(v["loss_diff"], v["grad_diff"], v["param_diff"]) < TOL, name
        assert v["measured"] == v["analytic"], name  # the ledger equals the formula, every collective
    for name in ("tp", "tp+sp"):  # each rank holds exactly param_count(cfg, tp) parameters
        assert r["variants"][name]["param_bytes"] == r["param_bytes_estimate"], name
    g = r["generate"]
    assert g["greedy_identical"] and g["sampled_same_on_ranks"] and g["max_logit_diff"] < TOL
    assert g["cache_bytes_per_rank"] == g["cache_bytes_formula"] == g["cache_bytes_one_process"] // 2


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
