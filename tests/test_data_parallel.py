"""Data parallel on 2 gloo ranks equals one process on the global batch; the ledger is exact.

One spawn runs every variant (spawning costs more than 5 tiny steps), module-scoped; the tests
below check its results. Tolerance: 1e-5 on parameters after 5 AdamW steps in fp32 (sums of
two halves vs one mean over the batch differ by float rounding, ~1e-7). Against one process that
splits the batch into the same two halves (gradient accumulation) the match is exact up to
SPLIT_TOL: (g0 + g1)/2 and g0/2 + g1/2 round identically. AdamW is blind to a
constant gradient scale (a forgotten 1/N would pass a parameter check), so the first step's
synced gradients are compared as well, within GRAD_TOL. The Llama family (tests/families.py) runs
one variant of each kind (naive, bucketed, DDP) in the same spawn: DP does not look inside the
model, so these check that nothing in it (an untied head, no biases) escapes the sync.
"""

from dataclasses import replace

import pytest
import torch.distributed as dist

from journey_dist.config import get_preset
from journey_dist.data import load_tokens
from journey_dist.model import GPT
from journey_dist.parallel.data.replicas import MB, bucket_layout, run_data_parallel
from journey_dist.parity import max_abs_diff, reference_run
from journey_dist.train import TrainConfig
from tests.dist import run_ranks
from tests.families import tiny
from tests.labs import assert_lab02_claims, run_lab

TOL = 1e-5
GRAD_TOL = 1e-6  # largest gradient entries are ~1e-1
SPLIT_TOL = 1e-7  # measured: 0.0 on CPU
CFG = TrainConfig(steps=5, batch_size=8, lr=3e-3, warmup_steps=1, grad_clip=1.0, seed=0)
TEXT = "handbook"  # the embedded corpus
TOTAL = sum(p.numel() * 4 for p in GPT(get_preset("tiny")).parameters())  # fp32 grad bytes
SIZES = {"one": 25.0, "two": 0.6 * TOTAL / MB, "several": TOTAL / 8 / MB}  # bucket_mb
RUNS = {  # name: (variant, bucket_mb, grad_accum)
    "naive": ("naive", 25.0, 1),
    **{f"bucketed_{k}": ("bucketed", mb, 1) for k, mb in SIZES.items()},
    "ddp_one": ("ddp", 25.0, 1),
    "ddp_several": ("ddp", SIZES["several"], 1),
    "naive_accum": ("naive", 25.0, 2),
    "bucketed_accum": ("bucketed", SIZES["several"], 2),
    "ddp_accum": ("ddp", SIZES["several"], 2),
}
LLAMA = tiny("llama")
LLAMA_TOTAL = sum(p.numel() * 4 for p in GPT(LLAMA).parameters())
LLAMA_RUNS = {"naive": ("naive", 25.0, 1), "bucketed": ("bucketed", LLAMA_TOTAL / 8 / MB, 1),
              "ddp": ("ddp", LLAMA_TOTAL / 8 / MB, 1)}


def _diffs(run, ref) -> dict:
    return {"param_diff": max_abs_diff(run.params, ref.params),
            "grad_diff": max_abs_diff(run.grads, ref.grads),
            "loss_diff": max(abs(a - b) for a, b in zip(run.losses, ref.losses)),
            "measured": run.comm["all_reduce"], "expected": run.analytic["all_reduce"]}


def _all_variants() -> dict:
    config, data = get_preset("tiny"), load_tokens(TEXT)
    ref = reference_run(config, data, CFG, first_grads=True)  # one process, global batch
    split = reference_run(config, data, replace(CFG, grad_accum=2))  # same, batch in two halves
    out = {}
    for name, (variant, mb, accum) in RUNS.items():
        run = run_data_parallel(variant, config, data, replace(CFG, grad_accum=accum), bucket_mb=mb)
        out[name] = {
            "param_diff": max_abs_diff(run.params, ref.params),
            "grad_diff": max_abs_diff(run.grads, ref.grads),
            "split_diff": max_abs_diff(run.params, split.params),
            "loss_diff": max(abs(a - b) for a, b in zip(run.losses, ref.losses)),
            "buffers": run.buffers["all_reduce"], "measured": run.comm["all_reduce"],
            "expected": run.analytic["all_reduce"], "ledger": run.details["ledger"],
            "ddp_buckets": run.details.get("ddp_buckets"),
        }
    out["_ref_losses"] = ref.losses
    out["_ref_grad_max"] = max(g.abs().max().item() for g in ref.grads.values())
    out["_rank"] = dist.get_rank()
    ref = reference_run(LLAMA, data, CFG, first_grads=True)
    out["llama"] = {name: _diffs(run_data_parallel(variant, LLAMA, data, replace(CFG, grad_accum=accum),
                                                   bucket_mb=mb), ref)
                    for name, (variant, mb, accum) in LLAMA_RUNS.items()}
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_all_variants, 2, timeout_s=240)


@pytest.mark.parametrize("name", [n for n, (_, _, accum) in RUNS.items() if accum == 1])
def test_parameters_equal_single_process_after_5_adamw_steps(results, name):
    assert results[0]["_ref_grad_max"] > 1e3 * GRAD_TOL  # the grad check is not vacuous
    for rank in results:
        assert rank[name]["grad_diff"] < GRAD_TOL, (name, rank[name]["grad_diff"])
        assert rank[name]["param_diff"] < TOL, (name, rank[name]["param_diff"])
        assert rank[name]["loss_diff"] < TOL, (name, rank[name]["loss_diff"])
        assert rank[name]["split_diff"] < SPLIT_TOL, (name, rank[name]["split_diff"])
    assert results[0]["_ref_losses"][-1] < results[0]["_ref_losses"][0]  # it really trained


@pytest.mark.parametrize("name", ["naive_accum", "bucketed_accum", "ddp_accum"])
def test_no_sync_accumulation_equals_full_batch_steps(results, name):
    r = results[0][name]
    assert r["grad_diff"] < GRAD_TOL and r["param_diff"] < TOL and r["loss_diff"] < TOL, r
    # Two micro-steps, but only the last one communicated: exactly one step's worth of calls.
    assert r["measured"]["calls"] == r["expected"]["calls"] == len(r["buffers"])


def test_bucket_sizes_force_one_two_and_several_buckets(results):
    counts = {k: len(results[0][f"bucketed_{k}"]["buffers"]) for k in SIZES}
    assert counts["one"] == 1 and counts["two"] == 2 and counts["several"] >= 4, counts
    for k, mb in SIZES.items():
        buffers = results[0][f"bucketed_{k}"]["buffers"]
        assert sum(buffers) == TOTAL
        assert all(b >= int(mb * MB) for b in buffers[:-1])  # every bucket but the last is full


def test_ledger_bytes_and_calls_equal_analytic(results):
    for rank in results:
        for name in RUNS:
            measured, expected = rank[name]["measured"], rank[name]["expected"]
            assert measured["bytes"] == expected["bytes"] == TOTAL, (name, measured, expected)
            assert measured["calls"] == expected["calls"], (name, measured, expected)
            assert measured["wire_bytes"] == pytest.approx(expected["wire_bytes"])  # 2(n-1)/n = 1
            assert [row["op"] for row in rank[name]["ledger"]] == ["all_reduce"]
    n_params = len(list(GPT(get_preset("tiny")).parameters()))
    assert results[0]["naive"]["measured"]["calls"] == n_params  # the tied matrix counted once


@pytest.mark.parametrize("name", LLAMA_RUNS)
def test_llama_family_equals_one_process_and_the_ledger_is_exact(results, name):
    for rank in results:
        r = rank["llama"][name]
        assert r["grad_diff"] < GRAD_TOL and r["param_diff"] < TOL and r["loss_diff"] < TOL, (name, r)
        assert r["measured"]["bytes"] == r["expected"]["bytes"] == LLAMA_TOTAL  # untied head included
        assert r["measured"]["calls"] == r["expected"]["calls"], (name, r)
    assert results[0]["llama"]["bucketed"]["measured"]["calls"] >= 4  # several buckets


def test_ddp_rebuilds_buckets_after_first_iteration(results):
    ddp = results[0]["ddp_several"]
    assert ddp["ddp_buckets"]["first_iteration"] == [TOTAL]  # one bucket until grads' order is known
    assert sum(ddp["ddp_buckets"]["rebuilt"]) == TOTAL
    assert len(ddp["ddp_buckets"]["rebuilt"]) == ddp["measured"]["calls"]


def test_bucket_layout_matches_pytorch():
    params = list(GPT(get_preset("tiny")).parameters())[::-1]
    for cap in (1, 4096, 30_000, 10**9):
        ours = bucket_layout([p.numel() * p.element_size() for p in params], cap)
        theirs, _ = dist._compute_bucket_assignment_by_size(params, [cap])
        assert ours == [list(b) for b in theirs], cap
    assert bucket_layout([], 10) == []
    for first, cap in ((1, 30_000), (4096, 30_000), (dist._DEFAULT_FIRST_BUCKET_BYTES, 10**9)):
        ours = bucket_layout([p.numel() * p.element_size() for p in params], cap, first)
        theirs, _ = dist._compute_bucket_assignment_by_size(params, [first, cap])
        assert ours == [list(b) for b in theirs], (first, cap)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_lab_runs_both_ways(tmp_path, launcher):
    _, result = run_lab("02_data_parallel", "--preset", "tiny", "--steps", "3", "--batch-size", "8",
                        "--bucket-mb", "0.05", "--data", TEXT, runs_dir=tmp_path,
                        torchrun=2 if launcher == "torchrun" else 0, timeout_s=240)
    assert_lab02_claims(result)  # shared with the notebook test


def test_bad_bucket_size_is_a_config_error():
    from journey_dist.config import ConfigError, check_bucket_mb

    with pytest.raises(ConfigError, match="positive number of MiB"):
        check_bucket_mb(0)
    assert check_bucket_mb(25) == 25.0
