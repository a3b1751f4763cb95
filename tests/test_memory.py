"""Memory: the estimator against DESIGN.md's reference points and against exact measurement."""

import json

import pytest
import torch

from journey_dist.cli import main
from journey_dist.config import ConfigError, ParallelConfig, get_preset, llama_ffn_dim
from journey_dist.memory.estimate import (
    activation_bytes_per_layer,
    estimate_memory,
    fmt_bytes,
    kv_cache_bytes,
    layer_param_count,
    model_state_bytes,
    model_tensors,
    param_count,
)
from journey_dist.memory.measure import TensorLedger, measure_config
from journey_dist.memory.report import (
    compare,
    layout_plans,
    measurement_text,
    peak_text,
    per_layer_vs_paper,
    plans_table,
    seq_sweep,
    sweep_table,
    terms_table,
)
from journey_dist.model import GPT, KVCache
from journey_dist.plan import make_plan, parse_bytes

# ---------------------------------------------------------------------- reference points


def test_gpt2_small_has_124_439_808_parameters():
    assert param_count(get_preset("gpt2-small")) == 124_439_808


@pytest.mark.parametrize("preset", ["tiny", "gpt-mini", "gpt2-medium", "llama-mini"])
@pytest.mark.parametrize("change", [{}, {"bias": False}, {"bias": True}, {"tie_embeddings": False},
                                    {"tie_embeddings": True}, {"n_kv_head": 1}])
def test_param_count_matches_the_model(preset, change):
    cfg = get_preset(preset, **change)
    with torch.device("meta"):
        model = GPT(cfg)
    assert param_count(cfg) == model.num_params()
    assert [(p.name, p.numel) for p in model_tensors(cfg)] == [
        (k, p.numel()) for k, p in model.named_parameters()]


def test_llama3_parameter_counts():
    assert param_count(get_preset("llama3-8b")) == 8_030_261_248
    assert param_count(get_preset("llama3-70b")) == 70_553_706_496
    assert param_count(get_preset("llama3-405b")) == 405_853_388_800
    widths = [llama_ffn_dim(4096, 1024, 1.3), llama_ffn_dim(8192, 4096, 1.3), llama_ffn_dim(16384, 4096, 1.2)]
    assert widths == [14336, 28672, 53248]  # Llama 3's SwiGLU widths from meta-llama's rule


def test_adamw_keeps_16_bytes_per_parameter_mixed_and_fp32():
    n = 1_000_000
    for dtype, split in (("bf16-mixed", (2, 2, 12)), ("fp32", (4, 4, 8)), ("bf16-autocast", (4, 4, 8))):
        s = model_state_bytes(n, dtype, "adamw")
        assert (s["params"], s["grads"], s["optimizer"]) == tuple(n * b for b in split)
        assert sum(s.values()) == 16 * n


def test_megatron_keeps_fp32_main_grads_18_and_20_bytes_per_parameter(tmp_path, monkeypatch, capsys):
    """Megatron-LM's table (docs, "Distributed Optimizer"): bf16 params + fp32 grads 18 B/param,
    6 + 12/d with its distributed optimizer (ZeRO-1 here); fp16 20 B, 4 + 16/d. The ZeRO paper's
    16 B (bf16-mixed) keeps 16-bit grads. Megatron reduces the fp32 grads: 4 B per value over dp."""
    n, d = 1_000_000, 8
    for dtype, whole, sharded in (("bf16-megatron", 18, 6 + 12 / d), ("fp16-megatron", 20, 4 + 16 / d)):
        assert sum(model_state_bytes(n, dtype).values()) == whole * n
        assert sum(model_state_bytes(n, dtype, dp=d, zero=1).values()) == sharded * n
    assert model_state_bytes(n, "bf16-megatron")["grads"] == 4 * n
    cfg = get_preset("gpt2-small")
    meg, mixed = (estimate_memory(cfg, batch_size=8, seq_len=1024, dtype=dt)
                  for dt in ("bf16-megatron", "bf16-mixed"))
    assert meg.grads - mixed.grads == 2 * param_count(cfg)
    assert (meg.params, meg.optimizer, meg.activations) == (mixed.params, mixed.optimizer, mixed.activations)
    for zero, ops in ((0, {"all_reduce": 4}), (1, {"reduce_scatter": 4, "all_gather": 2})):
        comm = make_plan(get_preset("gpt-mini"), ParallelConfig(dp=2, zero=zero), batch=8,
                         dtype="bf16-megatron")["stages"][0]["comm"]["dp"]
        for op, nbytes in ops.items():
            assert comm[op]["bytes"] == param_count(get_preset("gpt-mini")) * nbytes, (zero, op)
    monkeypatch.setenv("JOURNEY_RUNS_DIR", str(tmp_path))
    assert main(["estimate", "--preset", "gpt-mini", "--dtype", "bf16-megatron"]) == 0
    rows = json.loads(next((tmp_path / "estimate").glob("*.json")).read_text())["rows"]
    assert next(r for r in rows if r["component"] == "grads")["formula"] == "N_trainable·4"
    assert "Megatron-LM's optimizer" in capsys.readouterr().out  # estimated, not measured


def test_zero_stages_divide_what_they_shard():
    n, dp = 1_200_000, 4
    full = model_state_bytes(n, "bf16-mixed", "adamw")
    shards = {1: {"optimizer"}, 2: {"optimizer", "grads"}, 3: {"optimizer", "grads", "params"}}
    for stage, sharded in shards.items():
        s = model_state_bytes(n, "bf16-mixed", "adamw", dp=dp, zero=stage)
        for k in full:
            assert s[k] == (full[k] / dp if k in sharded else full[k]), (stage, k)


def test_lora_only_trainable_params_get_grads_and_optimizer_state():
    s = model_state_bytes(1_000_000, "fp32", "adamw", trainable_params=10_000)
    assert s == {"params": 4_000_000, "grads": 40_000, "optimizer": 80_000}


# Korthikanti et al. 2022 on their GPT-3 175B row: s=2048, b=1, h=12288, a=96, t=8.
S, B, H, A, T = 2048, 1, 12288, 96, 8
SBH = S * B * H  # 25,165,824


def test_korthikanti_formula_on_gpt3_175b():
    assert activation_bytes_per_layer(S, B, H, A) == SBH * (34 + 5 * A * S / H)  # 2,868,903,936
    assert activation_bytes_per_layer(S, B, H, A) == 2_868_903_936
    assert activation_bytes_per_layer(S, B, H, A, tp=T) == SBH * (10 + 24 / T + 5 * A * S / (H * T))
    assert activation_bytes_per_layer(S, B, H, A, tp=T) == 578_813_952  # sbh x 23
    assert activation_bytes_per_layer(S, B, H, A, tp=T, sequence_parallel=True) == SBH * (34 / T + 10)
    assert activation_bytes_per_layer(S, B, H, A, fused_attention=True) == SBH * 34
    # fp32 without dropout: 16 values x 4 bytes and one fp32 score matrix
    fp32 = activation_bytes_per_layer(S, B, H, A, bytes_per_value=4, dropout=False)
    assert fp32 == SBH * 64 + 4 * A * S * S * B


@pytest.mark.parametrize("tp,sp", [(1, False), (8, False), (8, True)])
def test_layer_terms_are_the_paper_plus_documented_extras(tp, sp):
    """16-bit, dropout, unfused attention, CUDA: our per-layer terms = the paper + LN stats + causal mask."""
    cfg = get_preset("gpt2-medium").with_(dropout=0.1, block_size=S, n_embd=H, n_head=A, vocab_size=51200)
    est = estimate_memory(cfg, batch_size=B, seq_len=S, dtype="bf16-mixed", attn="eager", tp=tp,
                          sequence_parallel=sp, device="cuda")
    terms = {t.name: t.nbytes for t in est.terms["per layer"]}
    extras = terms.pop("LayerNorm mean and rstd (ln_1, ln_2)")
    extras += terms.pop("causal mask (bool, made per layer)")
    assert extras < 0.02 * sum(terms.values())  # 0.15% (t=1) to 1.2% (t=8, SP): the s x s mask
    paper = activation_bytes_per_layer(S, B, H, A, tp=tp, sequence_parallel=sp)
    assert sum(terms.values()) == pytest.approx(paper)


@pytest.mark.parametrize("preset", ["tiny", "llama-mini"])
def test_kv_cache_bytes_match_the_model_cache(preset):
    cfg = get_preset(preset)
    assert kv_cache_bytes(cfg, 3, 20, "fp32") == KVCache(cfg, 3, 20).nbytes()
    assert kv_cache_bytes(cfg, 3, 20, "bf16") == KVCache(cfg, 3, 20, dtype=torch.bfloat16).nbytes()
    assert kv_cache_bytes(cfg, 3, 20, "bf16", kv_heads=1) * cfg.kv_heads == kv_cache_bytes(cfg, 3, 20, "bf16")
    assert kv_cache_bytes(cfg, 3, 20, "fp32") == 2 * cfg.n_layer * 3 * 20 * cfg.kv_heads * cfg.head_dim * 4


def test_llama3_8b_kv_cache_is_one_gib_at_8k_tokens():
    cfg = get_preset("llama3-8b")  # 2 (K, V) x 32 layers x 1 x 8,192 tokens x 8 kv heads x 128 x 2 bytes
    assert kv_cache_bytes(cfg, 1, 8192, "bf16") == 2 * 32 * 8192 * 8 * 128 * 2 == 1_073_741_824
    assert kv_cache_bytes(cfg, 1, 8192, "bf16", kv_heads=cfg.n_head) == 4 * 1_073_741_824  # without GQA


def test_estimate_divides_by_tp_pp_and_recompute_shrinks_activations():
    cfg = get_preset("gpt2-small")
    one = estimate_memory(cfg, batch_size=8, seq_len=1024, dtype="bf16-mixed")
    tp2 = estimate_memory(cfg.with_(vocab_size=50304), batch_size=8, seq_len=1024, dtype="bf16-mixed", tp=2)
    sp2 = estimate_memory(cfg.with_(vocab_size=50304), batch_size=8, seq_len=1024, dtype="bf16-mixed", tp=2,
                          sequence_parallel=True)
    rc = estimate_memory(cfg, batch_size=8, seq_len=1024, dtype="bf16-mixed", recompute=True)
    assert one.activations / 2 < tp2.activations < one.activations  # LayerNorm region stays replicated
    assert sp2.activations == pytest.approx(one.activations / 2, rel=0.01)
    assert rc.activations < one.activations / 10
    assert one.total == max(sum(p.values()) for p in one.phases.values())
    assert one.peak_phase.startswith("backward: log-softmax")  # 8 x 1024 x 50257 fp32 buffers dominate
    stages = [param_count(cfg, pp=4, stage=s) for s in range(4)]
    assert sum(stages) == param_count(cfg) + cfg.vocab_size * cfg.n_embd  # the last stage's head copy


def test_bad_layouts_raise_config_errors():
    cfg = get_preset("gpt2-small")
    with pytest.raises(ConfigError, match="does not divide n_head"):
        estimate_memory(cfg, batch_size=8, seq_len=128, tp=5)
    with pytest.raises(ConfigError, match="needs dp > 1"):
        estimate_memory(cfg, batch_size=8, seq_len=128, zero=2)
    with pytest.raises(ConfigError, match="unknown dtype"):
        estimate_memory(cfg, batch_size=8, seq_len=128, dtype="int4")
    with pytest.raises(ConfigError, match="seq_len"):
        estimate_memory(cfg, batch_size=8, seq_len=4096)


# ---------------------------------------------------------------------- tensor parallel shards


COLUMN = ("c_fc", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output rows
ROW = ("c_proj", "o_proj", "down_proj")  # weights split by input columns, biases replicated


def _megatron_rank_numel(model: GPT, tp: int, rank: int) -> int:
    """Elements one TP rank holds if a plain GPT is split as Megatron does (checked to partition).
    k_proj and v_proj split by kv heads: rank r keeps kv heads r·K/t.., the ones its queries read."""
    C, D, n = model.config.n_embd, model.config.head_dim, 0
    for name, p in model.named_parameters():
        layer = name.split(".")[-2]
        if name in ("transformer.wte.weight", "lm_head.weight"):  # vocab-parallel (tied: counted once)
            n += p.chunk(tp, dim=0)[rank].numel()
        elif layer == "c_attn":
            q, k, v = p.split(C, dim=0)  # column-parallel, split by heads inside each of q, k, v
            n += sum(t.chunk(tp, dim=0)[rank].numel() for t in (q, k, v))
        elif layer in ("k_proj", "v_proj"):
            heads = p.view(-1, D, *p.shape[1:])  # (K, D, C) or (K, D): whole kv heads per rank
            n += heads.chunk(tp, dim=0)[rank].numel()
        elif layer in COLUMN:
            n += p.chunk(tp, dim=0)[rank].numel()
        elif layer in ROW and name.endswith("weight"):
            n += p.chunk(tp, dim=1)[rank].numel()  # row-parallel: split the input dimension
        else:  # norms, row-parallel biases, positions: replicated
            n += p.numel()
    return n


def test_tp2_rank_param_bytes_match_megatron_slicing_of_plain_gpt():
    """Megatron's slicing rule on a plain GPT's weights, no processes: per-rank parameter bytes =
    the estimate, for every rank. The tensor-parallel model's own shards are checked against the
    same estimate on 2 ranks in tests/test_tensor_parallel.py (rank parameter bytes)."""
    cfg = get_preset("tiny")
    model = GPT(cfg)
    for dtype, nbytes in (("fp32", 4), ("bf16-mixed", 2)):
        est = estimate_memory(cfg, batch_size=2, seq_len=16, dtype=dtype, tp=2)
        per_rank = [_megatron_rank_numel(model, 2, r) * nbytes for r in range(2)]
        assert per_rank == [est.params, est.params]
        assert per_rank[0] == param_count(cfg, tp=2) * nbytes
    replicated = model.num_params() - cfg.vocab_size * cfg.n_embd - cfg.n_layer * 12 * cfg.n_embd**2 - (
        cfg.n_layer * 7 * cfg.n_embd)
    assert 2 * param_count(cfg, tp=2) - replicated == model.num_params()  # shards + replicas = the model


@pytest.mark.parametrize("change", [{}, {"bias": True, "tie_embeddings": True}])
def test_llama_tp_rank_params_split_kv_by_kv_heads(change):
    cfg = get_preset("llama-mini", **change)  # 4 query heads, 2 kv heads, SwiGLU 352
    with torch.device("meta"):
        model = GPT(cfg)
    for tp in (1, 2):
        est = estimate_memory(cfg, batch_size=2, seq_len=16, dtype="bf16-mixed", tp=tp)
        assert [_megatron_rank_numel(model, tp, r) * 2 for r in range(tp)] == [est.params] * tp
    h, d = cfg.n_embd, cfg.head_dim  # on 2 ranks: 2 query heads and 1 kv head each
    split = h * (2 + 1 + 1) * d + (2 * d) * h + 3 * h * (352 // 2)  # q, k, v; o; gate, up, down
    assert layer_param_count(cfg, tp=2) - layer_param_count(cfg.with_(bias=False), tp=2) == (
        (2 * d + 2 * 1 * d + 2 * 176 + h + h) if cfg.bias else 0)  # column biases split, row ones not
    assert layer_param_count(cfg.with_(bias=False), tp=2) == split + 2 * h


# ---------------------------------------------------------------------- measurement


def test_ledger_counts_storages_once_and_follows_frees():
    with TensorLedger() as led:
        a = torch.empty(1000)
        view = a.view(10, 100)  # same storage: not counted again
        b = torch.empty(500, dtype=torch.float64)
        assert led.total == 8000
        del b
        assert led.total == 4000
        c = view * 2  # a new storage
        assert led.total == 8000
        del c, a, view
    assert led.peak == 8000 and led.total == 0


@pytest.mark.parametrize("preset,batch,seq,dtype,attn,dropout", [
    ("tiny", 4, 32, "fp32", "sdpa", 0.0),
    ("gpt-mini", 2, 64, "bf16-autocast", "eager", 0.1),
    ("llama-mini", 4, 32, "fp32", "sdpa", 0.0),
    ("llama-mini", 2, 64, "bf16-autocast", "eager", 0.1),
])
def test_cpu_measured_matches_estimate(preset, batch, seq, dtype, attn, dropout):
    cfg = get_preset(preset, attn_impl=attn, dropout=dropout)
    meas = measure_config(cfg, batch_size=batch, seq_len=seq, dtype=dtype, device="cpu")
    est = estimate_memory(cfg, batch_size=batch, seq_len=seq, dtype=dtype, device="cpu")
    for k in ("params", "grads", "optimizer"):
        assert meas.high_water[k] == getattr(est, k), k  # exact
    rows = {r["component"]: r for r in compare(est, meas)}
    assert abs(rows["total"]["error_pct"]) < 5, rows["total"]
    assert abs(rows["activations"]["error_pct"]) < 5, rows["activations"]
    assert meas.rss["rss"] > meas.peak  # the OS view includes the interpreter


def test_lab07_report_pieces_carry_the_measured_and_estimated_numbers():
    cfg = get_preset("tiny")
    est = estimate_memory(cfg, batch_size=2, seq_len=16, dtype="fp32", device="cpu")
    text = terms_table(est)
    assert all(t.name in text and t.formula in text for terms in est.terms.values() for t in terms)
    per_layer = sum(t.nbytes for t in est.terms["per layer"])
    paper = activation_bytes_per_layer(16, 2, cfg.n_embd, cfg.n_head, dropout=False, fused_attention=True,
                                       bytes_per_value=4)
    assert per_layer > paper and f"keeps {fmt_bytes(per_layer)};" in per_layer_vs_paper(est)
    assert per_layer_vs_paper(est).endswith(f"is {fmt_bytes(paper)}")
    tp2 = estimate_memory(cfg, batch_size=2, seq_len=16, dtype="fp32", device="cpu", tp=2)  # the paper's /t
    assert per_layer_vs_paper(tp2).endswith(fmt_bytes(activation_bytes_per_layer(
        16, 2, cfg.n_embd, cfg.n_head, tp=2, dropout=False, fused_attention=True, bytes_per_value=4)))

    sweep = seq_sweep(cfg, [8, 16], batch_size=2, dtype="fp32", device=torch.device("cpu"))
    assert [(r["seq"], r["attn"]) for r in sweep] == [(8, "sdpa"), (8, "eager"), (16, "sdpa"), (16, "eager")]
    for r in sweep:  # exact on CPU, and each row is its own measurement
        e = estimate_memory(cfg.with_(attn_impl=r["attn"]), batch_size=2, seq_len=r["seq"], dtype="fp32")
        assert r["activations_measured"] == r["activations_estimated"] == e.activations, r
    assert len(sweep_table(sweep).splitlines()) == 1 + len(sweep)
    meas = measure_config(cfg, batch_size=2, seq_len=16, dtype="fp32", device="cpu")
    assert meas.instrument in measurement_text(meas) and fmt_bytes(meas.rss["rss"]) in measurement_text(meas)
    assert f"{est.peak_phase}  <- peak" in peak_text(est, meas)
    assert f"activations {fmt_bytes(meas.at_peak['activations'])}" in peak_text(est, meas)

    layouts = [{}, {"dp": 2, "zero": 1}, {"tp": 2}]
    plans = layout_plans(cfg, layouts, batch_size=4, seq_len=16, dtype="bf16-mixed")
    assert [p["layout"] for p in plans] == ["one GPU", "dp=2, zero=1", "tp=2"]
    for layout, plan in zip(layouts, plans):
        e = estimate_memory(cfg, batch_size=4, seq_len=16, dtype="bf16-mixed", **layout)
        assert (plan["total"], plan["model_states"]) == (e.total, e.params + e.grads + e.optimizer)
    assert plans[1]["model_states"] < plans[0]["model_states"]  # ZeRO-1 shards the optimizer state
    assert len(plans_table(plans).splitlines()) == len(plans)


def test_cli_estimate_measures_one_device_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JOURNEY_RUNS_DIR", str(tmp_path))
    assert main(["estimate", "--preset", "tiny", "--batch", "2", "--seq", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "measured with: tensor ledger" in out
    data = json.loads(next((tmp_path / "estimate").glob("*.json")).read_text())
    total = next(r for r in data["rows"] if r["component"] == "total")
    assert total["measured"] > 0 and abs(total["error_pct"]) < 5
    assert next((tmp_path / "estimate").glob("*.png")).stat().st_size > 0


def test_cli_estimate_parallel_layout_is_estimate_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JOURNEY_RUNS_DIR", str(tmp_path))
    argv = ["estimate", "--preset", "gpt2-small", "--batch", "8", "--seq", "1024", "--dtype", "bf16",
            "--tp", "2", "--zero", "2", "--device", "cuda"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "assuming --dp 2" in out and "padded to 50258" in out and "not run" in out


def test_cli_estimate_llama3_8b_per_rank(tmp_path, monkeypatch, capsys):
    """dp 8 x tp 8, ZeRO-1, one 8,192-token sequence per rank (--batch is the global batch)."""
    monkeypatch.setenv("JOURNEY_RUNS_DIR", str(tmp_path))
    argv = ["estimate", "--preset", "llama3-8b", "--batch", "8", "--seq", "8192", "--dtype", "bf16-mixed",
            "--tp", "8", "--zero", "1", "--dp", "8", "--device", "cuda", "--measure", "no", "-v"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "micro-batch 1" in out and "not run" in out
    data = json.loads(next((tmp_path / "estimate").glob("llama3-8b*.json")).read_text())
    rows = {r["component"]: r["estimated"] for r in data["rows"]}
    cfg, n = get_preset("llama3-8b"), 1 * 8192
    per_rank = param_count(cfg, tp=8)  # 32 query heads, 8 kv heads, 14,336 SwiGLU columns over 8 ranks
    assert per_rank == 128_256 * 4096 * 2 // 8 + 32 * (4096 * (4096 + 2 * 1024 + 4096 + 3 * 14336) // 8
                                                         + 2 * 4096) + 4096
    assert (rows["params"], rows["grads"], rows["optimizer"]) == (2 * per_rank, 2 * per_rank,
                                                                   12 * per_rank / 8 + 0)
    terms = {t["name"]: t["nbytes"] for t in data["estimate"]["terms"]["per layer"]}
    # fused attention keeps q (4 heads per rank) and k, v (1 kv head per rank) after RoPE: 2·n·(4 + 2)·128
    assert terms["q, k, v (after RoPE, k and v with kv heads, kept by SDPA)"] == 2 * n * (4 + 2) * 128
    assert terms["SiLU output"] == 2 * n * 14336 // 8
    assert 10 * 2**30 < rows["total"] < 30 * 2**30  # fits an 80 GB GPU with room for the workspace


def test_plan_llama3_8b_stages_are_the_estimate():
    cfg = get_preset("llama3-8b")
    pcfg = ParallelConfig(dp=8, tp=8, pp=2, microbatches=8, zero=1)
    plan = make_plan(cfg, pcfg, batch=64, seq=8192, dtype="bf16-mixed", gpu_mem=parse_bytes("80GB"))
    kw = dict(batch_size=64, seq_len=8192, dtype="bf16-mixed", dp=8, tp=8, pp=2, microbatches=8, zero=1)
    for s, row in enumerate(plan["stages"]):
        est = estimate_memory(cfg, stage=s, **kw)
        assert (row["memory"]["params"], row["memory"]["peak"]) == (est.params, est.total)
        assert row["params"] == param_count(cfg, 8, 2, s)
    assert plan["fits"]  # stage 0: 16 layers x 2 micro-batches in flight (1F1B), 14.9 GiB


@pytest.mark.parametrize("argv,message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "gpt2-small", "--tp", "5"], "tp=5 does not divide n_head=12"),
])
def test_cli_bad_arguments_give_the_config_error(argv, message, capsys):
    assert main(["estimate", *argv, "--measure", "no"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,attn", [("fp32", "sdpa"), ("bf16-autocast", "eager")])
def test_gpu_allocator_peak_matches_estimate(dtype, attn):
    cfg = get_preset("gpt-mini", attn_impl=attn)
    meas = measure_config(cfg, batch_size=16, seq_len=128, dtype=dtype, device="cuda")
    est = estimate_memory(cfg, batch_size=16, seq_len=128, dtype=dtype, device="cuda")
    expected = est.total + meas.cuda["workspace"]  # cuBLAS workspaces: measured, not modelled
    assert abs(expected - meas.cuda["max_allocated"]) / meas.cuda["max_allocated"] < 0.05
