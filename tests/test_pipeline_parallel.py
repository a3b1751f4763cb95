"""Pipeline parallel: the split, the schedules, parity with one process and with
torch.distributed.pipelining, the measured bubble, and shape mismatches that fail instead of hang.

Tolerances: parity 1e-5 (observed ~1e-8 on gradients, ~1e-6 on parameters after 3 AdamW steps:
float rounding of per-microbatch sums). Bubble: |measured - (p-1)/(m+p-1)| <= 0.06 on stages
that sleep 20 ms forward / 40 ms backward (observed <= 0.03 on a loaded 2-core machine; the
excess is message latency and timer jitter, which only add idle time).
"""

import time

import pytest
import torch
import torch.distributed as dist

from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import get_batch, load_tokens, microbatches
from journey_dist.mesh import build_mesh
from journey_dist.model import GPT
from journey_dist.parallel.pipeline.orders import Action, bubble_formula, check_schedule, schedule_order
from journey_dist.parallel.pipeline.p2p import P2P, ShapeMismatchError
from journey_dist.parallel.pipeline.schedules import Pipeline, pipeline_run
from journey_dist.parallel.pipeline.stage import GPTStage, build_stage, stage_layers, stage_summary
from journey_dist.parallel.pipeline.timeline import bubble_row, bubble_sweep, timelines_text
from journey_dist.parity import fresh_model, max_abs_diff, reference_run, worst_diffs
from journey_dist.report import bubble_table
from journey_dist.train import TrainConfig
from tests.dist import RankFailure, run_ranks
from tests.families import tiny

TOL = 1e-5
CFG = TrainConfig(steps=3, batch_size=8, grad_accum=4, warmup_steps=1, eval_batches=1)


# ----------------------------------------------------------------------------- single process


def test_stage_layers_are_contiguous_and_balanced():
    for n_layer, pp in [(4, 2), (4, 4), (5, 3), (7, 3), (12, 5), (3, 1)]:
        split = stage_layers(n_layer, pp)
        assert [i for r in split for i in r] == list(range(n_layer))
        sizes = [len(r) for r in split]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert [len(r) for r in stage_layers(7, 4)] == [2, 2, 2, 1]  # middle stages take extras first
    assert [len(r) for r in stage_layers(5, 4)] == [1, 2, 1, 1]
    with pytest.raises(ConfigError, match="pp=3 is larger than n_layer=2"):
        stage_layers(2, 3)


@pytest.mark.parametrize("p,m", [(2, 4), (3, 3), (4, 8), (2, 1)])
def test_schedule_orders(p, m):
    for schedule in ("gpipe", "1f1b"):
        if schedule == "1f1b" and m < p:
            with pytest.raises(ConfigError, match=f"microbatches={m} < pp={p}"):
                schedule_order(schedule, m, p, 0)
            continue
        for s in range(p):
            order = schedule_order(schedule, m, p, s)
            assert sorted(order) == sorted([Action(k, j) for k in "FB" for j in range(m)])
            assert all(order.index(Action("F", j)) < order.index(Action("B", j)) for j in range(m))
            held, peak = 0, 0
            for kind, *_ in order:
                held += 1 if kind == "F" else -1
                peak = max(peak, held)
            assert peak == (m if schedule == "gpipe" else min(p - s, m))


def test_chained_stages_equal_the_full_model():
    torch.manual_seed(0)
    model = GPT(get_preset("tiny", n_layer=3))
    idx = torch.randint(0, 256, (2, 16))
    logits, _ = model(idx)
    for p in (1, 2, 3):
        stages = [GPTStage(model, s, p) for s in range(p)]
        x = idx
        for stage in stages:
            x = stage(x)
        assert torch.equal(x, logits)
        names = {n for st in stages for n, _ in st.named_parameters()}
        assert names - {"lm_head.weight"} == {n for n, _ in model.named_parameters()}
        if p > 1:  # the last stage's copy of the tied matrix is a separate, equal tensor
            assert stages[-1].lm_head.weight is not model.transformer.wte.weight
            assert torch.equal(stages[-1].lm_head.weight, model.transformer.wte.weight)


def test_check_schedule_errors():
    check_schedule("gpipe", 1, 2)  # GPipe runs (idle) with fewer microbatches than stages
    with pytest.raises(ConfigError, match="use microbatches >= 4"):
        check_schedule("1f1b", 3, 4)
    with pytest.raises(ConfigError, match="schedule='zb'"):
        check_schedule("zb", 4, 2)


# ----------------------------------------------------------------------------- parity (gloo ranks)


def _parity_rank(config, cfg, engines, llama=None):
    data = load_tokens("handbook")
    out = {"ref": reference_run(config, data, cfg, first_grads=True)}
    for engine, schedule in engines:
        run, pipe = pipeline_run(config, data, cfg, schedule=schedule, engine=engine)
        out[engine, schedule] = (run, pipe.peak_inflight)
        out["worst", engine, schedule] = worst_diffs(run, out["ref"], subset=True, val_loss=True)
    out["summary"] = stage_summary(pipe.stage)
    if llama is not None:  # the Llama family (untied head, RoPE: no wpe) through the same schedules
        out["llama ref"] = reference_run(llama, data, cfg, first_grads=True)
        for engine, schedule in engines:
            run, pipe = pipeline_run(llama, data, cfg, schedule=schedule, engine=engine)
            out["llama", engine, schedule] = (run, pipe.peak_inflight)
    return out


@pytest.fixture(scope="module")
def two_stages():
    engines = [(e, s) for e in ("ours", "torch") for s in ("gpipe", "1f1b")]
    return run_ranks(_parity_rank, 2, get_preset("tiny"), CFG, engines, tiny("llama"))


def _check_parity(ranks, key, ref_key="ref"):
    ref = ranks[0][ref_key]
    for r, res in enumerate(ranks):
        run, _ = res[key]
        assert max(abs(a - b) for a, b in zip(run.losses, ref.losses)) < TOL, (key, r)
        grads = max_abs_diff(run.grads, ref.grads, subset=True, cover=run.params)  # every stage parameter
        assert grads < TOL, (key, r, "grads after step 1")
        assert max_abs_diff(run.params, ref.params, subset=True) < TOL, (key, r, "params after 3 steps")
        assert abs(run.val_loss - ref.val_loss) < TOL
    names = {n for res in ranks for n in res[key][0].params}
    tied = "lm_head.weight" not in ref.params
    assert names - ({"lm_head.weight"} if tied else set()) == set(ref.params)  # each on some stage
    if tied:  # both copies of the tied embedding took identical steps
        first, last = ranks[0][key][0].params, ranks[-1][key][0].params
        assert torch.equal(first["transformer.wte.weight"], last["lm_head.weight"])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_matches_single_process(two_stages, schedule):
    _check_parity(two_stages, ("ours", schedule))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_torch_pipelining_agrees(two_stages, schedule):
    _check_parity(two_stages, ("torch", schedule))
    for res in two_stages:  # and with ours directly
        ours, theirs = res["ours", schedule][0], res["torch", schedule][0]
        assert max(abs(a - b) for a, b in zip(ours.losses, theirs.losses)) < TOL
        assert max_abs_diff(ours.grads, theirs.grads, subset=True, cover=ours.params) < TOL
        assert max_abs_diff(ours.params, theirs.params, subset=True) < TOL


def test_worst_diffs_are_the_worst_stage_on_every_rank(two_stages):
    key = ("ours", "1f1b")
    local = [{"loss": max(abs(a - b) for a, b in zip(res[key][0].losses, res["ref"].losses)),
              "grad": max_abs_diff(res[key][0].grads, res["ref"].grads, subset=True),
              "param": max_abs_diff(res[key][0].params, res["ref"].params, subset=True),
              "val_loss": abs(res[key][0].val_loss - res["ref"].val_loss)} for res in two_stages]
    worst = {k: max(d[k] for d in local) for k in local[0]}
    assert max(worst["grad"], worst["param"]) > 0  # something to take the worst of
    for res in two_stages:  # the same on both ranks: the larger stage's diff, in float32
        assert res["worst", "ours", "1f1b"] == pytest.approx(worst, rel=1e-6, abs=0)


def test_stage_summary_counts_what_each_stage_built(two_stages):
    config = get_preset("tiny")
    s0, s1 = (res["summary"] for res in two_stages)
    assert (s0["layers"], s1["layers"]) == ("0..0", "1..1")
    assert s0["also"] == "embedding" and s1["also"].startswith("ln_f, head, loss, its own copy of wte")
    full = sum(p.numel() for p in GPT(config).parameters())  # wte counted once
    assert s0["parameters"] + s1["parameters"] == full + config.vocab_size * config.n_embd


@pytest.mark.parametrize("engine", ["ours", "torch"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_llama_family_pipeline_matches_single_process(two_stages, engine, schedule):
    _check_parity(two_stages, ("llama", engine, schedule), ref_key="llama ref")


def test_peak_inflight_is_measured(two_stages):
    m = CFG.grad_accum
    assert [res["ours", "gpipe"][1] for res in two_stages] == [m, m]
    peaks = [res["ours", "1f1b"][1] for res in two_stages]
    assert all(1 <= peak <= 2 - s < m for s, peak in enumerate(peaks)), peaks


def test_three_stages_match_single_process():
    ranks = run_ranks(_parity_rank, 3, get_preset("tiny", n_layer=3), CFG,
                      [("ours", "gpipe"), ("ours", "1f1b")])
    for schedule in ("gpipe", "1f1b"):
        _check_parity(ranks, ("ours", schedule))
    assert [res["ours", "1f1b"][1] for res in ranks] == [3, 2, 1]  # p - stage, counted at runtime


def _pp_dp_rank(config, cfg):
    mesh = build_mesh(ParallelConfig(pp=2, dp=2, microbatches=cfg.grad_accum))
    run, _ = pipeline_run(config, load_tokens("handbook"), cfg, group=mesh.pp_group, dp_group=mesh.dp_group)
    ref = reference_run(config, load_tokens("handbook"), cfg, first_grads=True)
    return mesh.coords, run, ref


@pytest.mark.slow
def test_pipeline_with_data_parallel_replicas_matches_single_process():
    # 4 ranks: two pipelines of two stages; each replica takes half the batch, sync_dp_grads averages.
    for coords, run, ref in run_ranks(_pp_dp_rank, 4, get_preset("tiny"), CFG):
        assert max(abs(a - b) for a, b in zip(run.losses, ref.losses)) < TOL, coords
        assert max_abs_diff(run.grads, ref.grads, subset=True, cover=run.params) < TOL, coords
        assert max_abs_diff(run.params, ref.params, subset=True) < TOL, coords


# ----------------------------------------------------------------------------- bubble


def _bubble_rank(ms):
    return bubble_sweep(("gpipe", "1f1b"), ms, f=0.02, b=0.02, w=0.02)


def test_measured_bubble_matches_formula():
    sweep = run_ranks(_bubble_rank, 2, [1, 2, 4, 8])[0]
    # 1F1B needs m >= p: the sweep leaves out (1f1b, 1)
    assert list(sweep) == [("gpipe", m) for m in (1, 2, 4, 8)] + [("1f1b", m) for m in (2, 4, 8)]
    results = [r for (s, m), r in sweep.items() if m > 1]
    for r in results:
        assert r["formula"] == bubble_formula(r["schedule"], 2, r["m"]) == 1 / (r["m"] + 1)
        assert abs(r["bubble"]["mean"] - r["formula"]) <= 0.06, (r["schedule"], r["m"], r["bubble"])
    by_m = {(r["schedule"], r["m"]): r["bubble"]["mean"] for r in results}
    for s in ("gpipe", "1f1b"):
        assert by_m[s, 2] > by_m[s, 4] > by_m[s, 8]  # more microbatches, smaller bubble
    assert [r["peak_inflight"] for r in results if r["schedule"] == "gpipe"] == [[2, 2], [4, 4], [8, 8]]
    assert all(r["peak_inflight"] == [2, 1] for r in results if r["schedule"] == "1f1b")
    rows = [bubble_row(r) for r in sweep.values()]  # what lab 04 prints and saves
    assert [(row["measured"], row["formula"], row["peak_inflight"]) for row in rows] == [
        (r["bubble"]["mean"], r["formula"], r["peak_inflight"]) for r in sweep.values()]
    text = bubble_table(rows).splitlines()
    assert len(text) == 1 + len(rows) and text[2].split()[:5] == ["gpipe", "2", f"{by_m['gpipe', 2]:.3f}",
                                                                 "0.333", f"{by_m['gpipe', 2] - 1 / 3:+.3f}"]
    shown = timelines_text({"1f1b m=2": sweep["1f1b", 2]["timelines"]}, orders=True).splitlines()
    assert shown[0] == "1f1b m=2:"
    assert shown[-2:] == ["  stage 0 order: F0 F1 B0 B1", "  stage 1 order: F0 B0 F1 B1"]


# ----------------------------------------------------------------------------- failing fast


def _mismatched_width_rank():
    n_embd = 32 if dist.get_rank() == 0 else 48  # stage 1 built from a different config
    stage = build_stage(fresh_model(get_preset("tiny", n_embd=n_embd)))
    x, y = get_batch(load_tokens("handbook").train, 8, 32, step=0)
    Pipeline(stage, schedule="1f1b").run(microbatches(x, y, 4))


class _TruncatingStage(GPTStage):
    """A broken stage 0: drops the last position, so it sends (B, T-1, C) instead of (B, T, C)."""

    def forward(self, x):
        out = super().forward(x)
        return out[:, :-1] if self.is_first else out


def _wrong_output_rank():
    stage = _TruncatingStage(fresh_model(get_preset("tiny")), dist.get_rank(), dist.get_world_size())
    x, y = get_batch(load_tokens("handbook").train, 8, 32, step=0)
    Pipeline(stage, schedule="gpipe").run(microbatches(x, y, 4))


def test_stages_that_disagree_on_width_fail_fast():
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)stages disagree.*\(2, 32, 32\).*\(2, 32, 48\)"):
        run_ranks(_mismatched_width_rank, 2, timeout_s=60, collective_timeout_s=30)
    assert time.monotonic() - t0 < 30


def test_stage_sending_the_wrong_shape_fails_fast():
    # Both ranks raise; the harness reports the first: the sender, or the receiver of its header.
    t0 = time.monotonic()
    sender = (r"stage 0 produced activations of shape \(2, 31, 32\) \(torch.float32\) for microbatch 0, "
              r"but the stages agreed on \(2, 32, 32\)")
    receiver = r"stage 1 expected activations of shape \(2, 32, 32\).*sent shape \(2, 31, 32\)"
    with pytest.raises(RankFailure, match=f"{sender}|{receiver}"):
        run_ranks(_wrong_output_rank, 2, timeout_s=60, collective_timeout_s=30)
    assert time.monotonic() - t0 < 30


def _header_check_rank():
    p2p = P2P(None, torch.device("cpu"))
    if dist.get_rank() == 0:  # sends only the header of a wrong (2, 5, 8) tensor, then raises
        with pytest.raises(ShapeMismatchError, match=r"stage 0 produced activations of shape \(2, 5, 8\)"):
            p2p.send(torch.zeros(2, 5, 8), "F", 0, (2, 4, 8), torch.float32)
        dist.barrier()  # rank 1 never gets here: the harness reports rank 1 and stops this one
    else:
        p2p.take(p2p.post("F", 0, (2, 4, 8), torch.float32))


def test_receiver_names_a_mismatched_header():
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank 1 failed.*ShapeMismatchError: stage 1 expected "
                       r"activations of shape \(2, 4, 8\) \(torch.float32\) for microbatch 0 from stage 0, "
                       r"but it sent shape \(2, 5, 8\)"):
        run_ranks(_header_check_rank, 2, timeout_s=60, collective_timeout_s=30)
    assert time.monotonic() - t0 < 30
