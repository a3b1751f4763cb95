"""`journey plan`: its numbers are the package's own estimates; bad runs exit 2, runs that do not fit 3.

The plan only calls functions other tests check against measurements (estimate_memory against the
tensor ledger, expected_comm_per_step against the CommLedger of a 3D run), so equality with them is
the check here; one ZeRO-1 plan is also checked against a 2-rank ledger run.
"""

import json

import pytest

from journey_dist.cli import main
from journey_dist.comm import ring_factor
from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.memory.estimate import estimate_memory, param_count
from journey_dist.mesh import layout_text
from journey_dist.parallel.compose import expected_comm_per_step
from journey_dist.parallel.pipeline.orders import bubble_formula, inflight_formula
from journey_dist.parallel.tensor.parallelize import analytic_collectives
from journey_dist.plan import make_plan, parse_bytes
from journey_dist.train import TrainConfig

MINI = get_preset("gpt-mini")


def _bytes(comm: dict) -> dict:
    return {dim: {op: row["bytes"] for op, row in ops.items()} for dim, ops in comm.items()}


def test_plan_schedules_give_their_bubble_and_held_activations(capsys):
    """journey plan --schedule: each schedule's bubble formula, the activation sets each stage
    holds (orders.inflight_formula) and the memory that follows from them (estimate_memory)."""
    plans = {}
    for s, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
        pcfg = ParallelConfig(pp=2, microbatches=4, schedule=s, virtual_stages=v)
        plans[s] = plan = make_plan(MINI, pcfg, batch=8, dtype="fp32")
        assert plan["bubble"] == bubble_formula(s, 2, 4, v)
        assert [r["in_flight"] for r in plan["stages"]] == [inflight_formula(s, 2, 4, r, v) for r in (0, 1)]
        for r in plan["stages"]:
            est = estimate_memory(MINI, batch_size=8, seq_len=128, pp=2, microbatches=4, schedule=s,
                                  virtual_stages=v, stage=r["stage"])
            assert r["memory"]["activations"] == est.activations
    assert [plans[s]["bubble"] for s in ("1f1b", "interleaved", "zb-h1")] == [1 / 5, 1 / 9, 1 / 13]
    last = {s: p["stages"][1]["memory"]["activations"] for s, p in plans.items()}
    assert last["gpipe"] == 4 * last["1f1b"] and last["zb-h1"] == 2 * last["1f1b"]  # holds p = 2, not 1
    assert main(["plan", "--preset", "gpt-mini", "--pp", "2", "--microbatches", "4", "--batch", "8",
                 "--schedule", "interleaved"]) == 0
    out = capsys.readouterr().out
    assert "pipeline bubble (interleaved): (p-1)/(v*m+p-1) = (2-1)/(2*4+2-1) = 11.1%" in out
    with pytest.raises(ConfigError, match=r"n_layer=4 is not divisible by pp\*virtual_stages = 2\*4"):
        make_plan(MINI, ParallelConfig(pp=2, microbatches=4, schedule="interleaved", virtual_stages=4),
                  batch=8)


@pytest.mark.parametrize("seq", [128, 64])
def test_gpt_mini_plan_equals_param_count_and_3d_comm(seq):
    pcfg = ParallelConfig(dp=2, tp=2, pp=2, microbatches=4)
    plan = make_plan(MINI, pcfg, batch=16, seq=seq, dtype="fp32")
    train = TrainConfig(batch_size=16, grad_accum=4)
    for s, row in enumerate(plan["stages"]):
        assert row["params"] == param_count(MINI, 2, 2, s)
        assert row["memory"]["params"] == param_count(MINI, 2, 2, s) * 4
        expected = expected_comm_per_step(MINI, pcfg, train, {"pp": s, "dp": 0, "tp": 0}, seq_len=seq)
        assert _bytes(row["comm"]) == expected
        assert row["comm"]["dp"]["all_reduce"]["bytes"] == row["memory"]["params"]  # every gradient once
        for dim, ops in row["comm"].items():
            for op, c in ops.items():
                assert c["wire_bytes"] == ring_factor(op, getattr(pcfg, dim)) * c["bytes"]
    # tp volume is linear in tokens (apart from the 4-byte clip norm): seq 64 halves it
    if seq == 64:
        full = make_plan(MINI, pcfg, batch=16, dtype="fp32")["stages"][0]["comm"]["tp"]["all_reduce"]["bytes"]
        assert plan["stages"][0]["comm"]["tp"]["all_reduce"]["bytes"] - 4 == (full - 4) // 2
    assert plan["bubble"] == bubble_formula("1f1b", 2, 4) == 1 / 5
    assert plan["micro_batch"] == 2 and plan["layout"] == layout_text(pcfg, limit=8)


def test_zero_and_sequence_parallel_comm():
    plan = make_plan(MINI, ParallelConfig(dp=4, zero=1, microbatches=2), batch=16, dtype="fp32")
    dp = _bytes(plan["stages"][0]["comm"])["dp"]
    flat = -(-param_count(MINI) // 4) * 4 * 4  # zero.padded_numel, fp32
    assert dp == {"reduce_scatter": flat, "all_gather": flat, "all_reduce": 4}
    z3 = _bytes(make_plan(MINI, ParallelConfig(dp=4, zero=3, microbatches=2), batch=16)["stages"][0]["comm"])
    assert z3["dp"]["all_gather"] == 2 * 2 * flat and z3["dp"]["reduce_scatter"] == 2 * flat
    sp = make_plan(MINI, ParallelConfig(tp=2, sequence_parallel=True, microbatches=2), batch=8)
    tp = _bytes(sp["stages"][0]["comm"])["tp"]
    ref = analytic_collectives(MINI, 2, 4 * 128, sequence_parallel=True, micro_steps=2)
    assert tp == {op: row["bytes"] for op, row in ref.items()}
    sp_pp = make_plan(MINI, ParallelConfig(tp=2, pp=2, sequence_parallel=True, microbatches=2), batch=8)
    assert "tp" in sp_pp["stages"][0]["comm_not_modelled"] and "tp" not in sp_pp["stages"][0]["comm"]


def test_gpt2_small_bf16_memory_matches_estimate_memory():
    cfg = get_preset("gpt2-small")
    pcfg = ParallelConfig(dp=2, tp=1, pp=2, microbatches=8, zero=1)
    plan = make_plan(cfg, pcfg, batch=32, seq=1024, dtype="bf16", gpu_mem=parse_bytes("80GB"))
    kw = dict(batch_size=32, seq_len=1024, dtype="bf16", dp=2, pp=2, microbatches=8, zero=1)
    for s, row in enumerate(plan["stages"]):
        est = estimate_memory(cfg, stage=s, **kw)
        mem = row["memory"]
        assert (mem["params"], mem["grads"], mem["optimizer"], mem["activations"], mem["peak"]) == (
            est.params, est.grads, est.optimizer, est.activations, est.total)
        assert mem["params"] == param_count(cfg, 1, 2, s) * 2 and row["fits"]
    # the busiest stage is what estimate_memory reports without a stage
    assert max(r["memory"]["peak"] for r in plan["stages"]) == estimate_memory(cfg, **kw).total
    small = make_plan(cfg, pcfg, batch=32, seq=1024, dtype="bf16", gpu_mem=parse_bytes("512MiB"))
    assert small["fits"] is False


def test_padded_vocab_and_parse_bytes():
    plan = make_plan(get_preset("gpt2-small"), ParallelConfig(tp=2), batch=8, dtype="bf16")
    assert plan["model"]["vocab_size"] == 50258 and "padded to 50258" in plan["notes"][0]
    assert parse_bytes("80GB") == 80e9 and parse_bytes("80 GiB") == 80 * 2**30
    with pytest.raises(ConfigError, match="80GiB"):
        parse_bytes("80")


@pytest.mark.parametrize("args, message", [
    (["--preset", "gpt2-small", "--tp", "5"],
     "tp=5 does not divide n_head=12; use a tp in [1, 2, 3, 4, 6, 12]"),
    (["--tp", "3"], "tp=3 does not divide n_head=4; use a tp in [1, 2, 4]"),
    (["--dp", "2", "--tp", "2", "--pp", "2", "--microbatches", "2", "--world", "4"],
     r"dp*tp*pp = 2*2*2 = 8 but the world has 4 ranks"),
    (["--dp", "2", "--microbatches", "3", "--batch", "8"], "not divisible by dp*microbatches = 2*3 = 6"),
    (["--pp", "2"], "microbatches=1 < pp=2"),
    (["--seq", "4096"], "seq_len=4096 must be in 1..block_size=128"),
    (["--gpu-mem", "lots"], "write a number and a unit"),
])
def test_bad_plans_exit_2_with_the_message(args, message, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("journey: error: ") and message in err


def test_cli_text_and_json(capsys):
    args = ["plan", "--dp", "2", "--tp", "2", "--pp", "2", "--microbatches", "4", "--batch", "16",
            "--gpu-mem", "1GiB"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "pp stage 1: dp0: [4, 5]" in text and "pipeline bubble (1f1b)" in text and "20.0%" in text
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 8 and len(plan["stages"]) == 2 and plan["fits"] is True


def _zero1_ledger(config, cfg):
    from journey_dist.data import load_tokens
    from journey_dist.parallel.sharding.zero import run_zero1

    return run_zero1(config, load_tokens("handbook"), cfg).comm


def test_zero1_plan_equals_the_ledger_of_a_2_rank_run():
    """The one plan path no other test measures: ZeRO-1's dp reduce-scatter + all-gather + clip
    all-reduce, against the CommLedger of zero.py's run (2 gloo ranks, tiny, fp32, one step)."""
    from tests.dist import run_ranks

    tiny = get_preset("tiny")
    cfg = TrainConfig(steps=1, batch_size=8, warmup_steps=1, eval_batches=1, grad_clip=1.0)
    plan = make_plan(tiny, ParallelConfig(dp=2, zero=1), batch=8, dtype="fp32")
    expected = plan["stages"][0]["comm"]["dp"]
    for measured in run_ranks(_zero1_ledger, 2, tiny, cfg, timeout_s=120.0):
        assert {op: {k: row[k] for k in ("bytes", "wire_bytes")} for op, row in measured.items()} == expected


def test_a_plan_that_does_not_fit_exits_3(capsys):
    """A launch script gates on `journey plan --gpu-mem`: 3 when a stage does not fit, 0 when all
    do (test_cli_text_and_json), documented in `journey plan --help`."""
    args = ["plan", "--dp", "2", "--batch", "16", "--gpu-mem", "1MiB"]
    assert main(args) == 3
    assert "per GPU: NO (stage 0 peaks at" in capsys.readouterr().out
    assert main([*args, "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["fits"] is False
    assert main(["plan", "--dp", "2", "--batch", "16"]) == 0  # no --gpu-mem: nothing to gate on
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "exit status is 3 when the plan does not fit" in " ".join(capsys.readouterr().out.split())


def test_plan_rows_are_the_stages_a_run_builds_when_pp_does_not_divide_the_layers():
    """One layer split (pipeline/stage.stage_layers) for the model, the estimator and the plan: the plan
    of gpt2-small (12 layers) on pp=5 used to give stage 0 three layers (the estimator's rule) but the
    tp bytes of the built split's two."""
    import torch

    from journey_dist.model import GPT
    from journey_dist.parallel.pipeline.stage import GPTStage

    cfg = get_preset("gpt2-small")
    for tp in (1, 2):
        plan = make_plan(cfg, ParallelConfig(tp=tp, pp=5, microbatches=8), batch=16)
        with torch.device("meta"):
            model = GPT(cfg.with_(vocab_size=plan["model"]["vocab_size"]))
        built = [GPTStage(model, s, 5) for s in range(5)]
        assert [r["layers"] for r in plan["stages"]] == [len(b.layers) for b in built] == [2, 3, 3, 2, 2]
        if tp == 1:  # parameters per stage, the last stage's copy of the tied embedding included
            assert [r["params"] for r in plan["stages"]] == [sum(p.numel() for p in b.parameters())
                                                            for b in built]
        else:  # tp bytes follow each stage's own layer count: 4 activations per layer per microbatch
            a = 16 // 8 * cfg.block_size * cfg.n_embd * 4
            tp_bytes = [r["comm"]["tp"]["all_reduce"]["bytes"] for r in plan["stages"]]
            assert tp_bytes[1] - tp_bytes[3] == 8 * 4 * a  # stage 1 has one layer more than stage 3


def test_llama_mini_plan_equals_param_count_and_3d_comm():
    # the Llama family (GQA split by kv heads, SwiGLU, no wpe, untied head): the same identities
    cfg, pcfg = get_preset("llama-mini"), ParallelConfig(dp=2, tp=2, pp=2, microbatches=4)
    plan = make_plan(cfg, pcfg, batch=16, dtype="fp32")
    for s, row in enumerate(plan["stages"]):
        assert row["params"] == param_count(cfg, 2, 2, s) and row["memory"]["params"] == row["params"] * 4
        expected = expected_comm_per_step(cfg, pcfg, TrainConfig(batch_size=16, grad_accum=4),
                                          {"pp": s, "dp": 0, "tp": 0})
        assert _bytes(row["comm"]) == expected
        assert row["comm"]["dp"]["all_reduce"]["bytes"] == row["memory"]["params"]  # every gradient once
