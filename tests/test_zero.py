"""ZeRO-1 from scratch and FSDP2 on 2 gloo ranks: parity, sharded bytes, ledger; config builders.

One spawn runs everything (module-scoped). Tolerances:
  OPT_TOL 1e-6: ZeroAdamW vs torch.optim.AdamW fed the same mean gradients (naive DP on the same
    ranks), no clipping, 5 steps (3 for the padded model and for 2 accumulated micro-steps).
    Same elementwise math, so measured 0.0.
  CLIP_TOL 1e-5: with clip_grad_norm 1.0, against one process (unsharded torch AdamW, the whole
    batch). ZeRO sums the global norm² over slices in fp64, torch takes fp32 per-tensor norms: the
    norms differ by ~1 ulp, the parameters by ~1e-6 after 5 steps.
  FSDP2 vs one process: 1e-5 (parameters), GRAD_TOL 1e-6 (first gradient; largest entries ~1e-1).
Both run the Llama family too (tests/families.py), with clipping, against one process.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch.distributed as dist

from journey_dist.config import ConfigError, get_preset
from journey_dist.data import load_tokens
from journey_dist.memory.estimate import model_state_bytes
from journey_dist.parallel.data.replicas import run_data_parallel
from journey_dist.parallel.sharding.deepspeed import STAGES, deepspeed_config, load_config
from journey_dist.parallel.sharding.fsdp import run_fsdp2
from journey_dist.parallel.sharding.zero import (
    padded_numel,
    run_zero1,
    shard_range,
    unsharded_adamw_state_bytes,
)
from journey_dist.parity import fresh_model, max_abs_diff, reference_run, replicated_state_bytes
from journey_dist.train import TrainConfig, make_optimizer
from tests.dist import run_ranks
from tests.families import FAMILIES, tiny

OPT_TOL = 1e-6
CLIP_TOL = 1e-5
TOL = 1e-5
GRAD_TOL = 1e-6
CFG = TrainConfig(steps=5, batch_size=8, lr=3e-3, warmup_steps=1, grad_clip=1.0, seed=0)
TINY = get_preset("tiny")
ODD = TINY.with_(n_layer=1, n_head=3, n_embd=33)  # an odd parameter count: ZeRO must pad
ROOT = Path(__file__).resolve().parents[1]


def _numel(config) -> int:
    return sum(p.numel() for p in fresh_model(config).parameters())


def _diffs(a, b) -> dict:
    out = {"params": max_abs_diff(a.params, b.params),
           "loss": max(abs(x - y) for x, y in zip(a.losses, b.losses))}
    if a.grads is not None and b.grads is not None:
        out["grads"] = max_abs_diff(a.grads, b.grads)
    return out


def _everything() -> dict:
    data = load_tokens("handbook")
    no_clip = replace(CFG, grad_clip=0.0)
    out = {"rank": dist.get_rank()}
    short = replace(no_clip, steps=3)  # padding and accumulation: 3 steps are enough to differ
    for name, config, cfg in (("tiny", TINY, no_clip), ("odd", ODD, short)):
        zero = run_zero1(config, data, cfg)
        naive = run_data_parallel("naive", config, data, cfg)  # torch AdamW, same mean grads
        out[f"{name}_no_clip"] = {**_diffs(zero, naive), "state": zero.state_bytes}
    accum = replace(short, grad_accum=2)  # two micro-steps accumulate into the flat buffer
    zero, naive = run_zero1(TINY, data, accum), run_data_parallel("naive", TINY, data, accum)
    out["tiny_accum"] = _diffs(zero, naive)
    ref = reference_run(TINY, data, CFG, first_grads=True)
    zero = run_zero1(TINY, data, CFG)  # ref is torch AdamW with clipping, unsharded, one process
    out["tiny_clip"] = {**_diffs(zero, ref), "comm": zero.comm, "analytic": zero.analytic}
    fsdp = run_fsdp2(TINY, data, CFG)
    out["fsdp2"] = {**_diffs(fsdp, ref), "state": fsdp.state_bytes, "comm": fsdp.comm,
                    "analytic": fsdp.analytic}
    llama = tiny("llama")
    ref = reference_run(llama, data, CFG, first_grads=True)
    zero = run_zero1(llama, data, CFG)
    out["llama_zero1"] = {**_diffs(zero, ref), "state": zero.state_bytes, "comm": zero.comm,
                          "analytic": zero.analytic}
    fsdp = run_fsdp2(llama, data, CFG)
    out["llama_fsdp2"] = {**_diffs(fsdp, ref), "state": fsdp.state_bytes, "comm": fsdp.comm,
                          "analytic": fsdp.analytic}
    model = fresh_model(TINY)  # what plain data parallel keeps: torch AdamW after one step
    opt = make_optimizer(model, CFG)
    model(*[t[:2] for t in _batch(data)])[1].backward()
    opt.step()
    out["replicated"] = replicated_state_bytes(model, opt)
    out["ref_grad_max"] = max(g.abs().max().item() for g in ref.grads.values())
    return out


def _batch(data):
    from journey_dist.data import get_batch

    return get_batch(data.train, 2, TINY.block_size, 0, 0)


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_everything, 2, timeout_s=240)


@pytest.mark.parametrize("name", ["tiny_no_clip", "odd_no_clip", "tiny_accum"])
def test_zero1_adamw_equals_torch_adamw_after_5_steps(results, name):
    for rank in results:
        r = rank[name]
        assert r["params"] <= OPT_TOL and r["grads"] <= OPT_TOL and r["loss"] <= OPT_TOL, r


@pytest.mark.parametrize("name", ["tiny_clip", "llama_zero1"])
def test_zero1_with_clipping_equals_one_process_adamw(results, name):
    assert results[0]["ref_grad_max"] > 1e3 * GRAD_TOL  # the gradient check is not vacuous
    for rank in results:
        r = rank[name]
        assert r["params"] <= CLIP_TOL and r["loss"] <= CLIP_TOL and r["grads"] <= GRAD_TOL, r


def test_odd_model_is_padded_and_each_rank_owns_half():
    n = _numel(ODD)
    assert n % 2 == 1 and padded_numel(n, 2) == n + 1
    assert shard_range(n, 2, 0) == (0, (n + 1) // 2) and shard_range(n, 2, 1) == ((n + 1) // 2, n + 1)
    assert padded_numel(10, 3) == 12 and shard_range(10, 3, 2) == (8, 12)


@pytest.mark.parametrize("name,config", [("tiny_no_clip", TINY), ("odd_no_clip", ODD)])
def test_zero1_optimizer_bytes_are_one_over_dp_plus_padding(results, name, config):
    n, dp = _numel(config), 2
    pad = padded_numel(n, dp) - n
    unsharded = unsharded_adamw_state_bytes(fresh_model(config))
    for rank in results:
        state = rank[name]["state"]
        assert state["optimizer"] == unsharded // dp + 8 * pad // dp
        assert state["params"] == state["grads"] == 4 * (n + pad)  # full weights and grads (ZeRO-1)
        est = model_state_bytes(n, "fp32", dp=dp, zero=1)
        assert state["optimizer"] - est["optimizer"] == 8 * pad / dp
    # torch's AdamW really keeps the unsharded amount on every plain-DP rank
    assert results[0]["replicated"]["optimizer"] == unsharded_adamw_state_bytes(fresh_model(TINY))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero1_ledger_equals_analytic(results, family):
    n = _numel(tiny(family))
    for rank in results:
        r = rank["tiny_clip" if family == "gpt2" else "llama_zero1"]
        comm, expected = r["comm"], r["analytic"]
        assert set(comm) == {"reduce_scatter", "all_gather", "all_reduce"}
        for op in comm:
            assert comm[op]["calls"] == expected[op]["calls"], op
            assert comm[op]["bytes"] == expected[op]["bytes"], op
            assert comm[op]["wire_bytes"] == pytest.approx(expected[op]["wire_bytes"]), op
        assert comm["reduce_scatter"]["bytes"] == comm["all_gather"]["bytes"] == 4 * n
        assert comm["all_reduce"]["bytes"] == 4  # only the global gradient norm²


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_equals_one_process_and_shards_everything(results, family):
    n = _numel(tiny(family))
    for rank in results:
        r = rank["fsdp2" if family == "gpt2" else "llama_fsdp2"]
        assert r["params"] <= TOL and r["loss"] <= TOL and r["grads"] <= GRAD_TOL, r
        est = model_state_bytes(n, "fp32", dp=2, zero=3)
        assert r["state"] == {k: int(v) for k, v in est.items()}, (r["state"], est)  # no padding here
        for op in ("all_gather", "reduce_scatter"):
            assert r["comm"][op]["bytes"] == r["analytic"][op]["bytes"], op
            assert r["comm"][op]["calls"] == r["analytic"][op]["calls"], op


# ---------------------------------------------------------------------- config builders


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_config_builders(stage):
    cpu = deepspeed_config(stage, micro_batch=4, grad_accum=2, grad_clip=0.5)
    assert cpu["zero_optimization"]["stage"] == stage
    assert cpu["train_micro_batch_size_per_gpu"] == 4 and cpu["gradient_accumulation_steps"] == 2
    assert cpu["gradient_clipping"] == 0.5 and not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    gpu = deepspeed_config(stage, dtype="bf16")
    assert gpu["bf16"]["enabled"]
    if stage == 3:  # every tensor partitioned, however small
        assert cpu["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    committed = json.loads((ROOT / "launch" / "deepspeed" / f"zero{stage}.json").read_text())
    assert committed == gpu  # launch/deepspeed/*.json are the builder's GPU output
    loaded = load_config(ROOT / "launch" / "deepspeed" / f"zero{stage}.json",
                         replace(CFG, batch_size=16, grad_accum=2), dp=2)
    assert loaded["train_micro_batch_size_per_gpu"] == 4 and loaded["gradient_accumulation_steps"] == 2


def test_deepspeed_config_rejects_bad_input():
    with pytest.raises(ConfigError, match="stage"):
        deepspeed_config(4)
    with pytest.raises(ConfigError, match="dtype"):
        deepspeed_config(1, dtype="fp8")
