"""`journey plan`'s time model: FLOPs from shapes, alpha-beta collectives, placement, search, clusters.

The FLOP count is checked against torch's own FlopCounterMode on the real model; the collective
times against the alpha-beta formulas written out; group placement against mesh.py's groups; the
search against the memory estimator; the cpu-gloo preset against the committed calibration.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from journey_dist.calibrate import Sample, sample, unloaded
from journey_dist.cli import main
from journey_dist.cluster import CLUSTERS, Link, cluster_toml, get_cluster, load_cluster, parse_count
from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.flops import attention_share, layer_forward_flops, model_flops_per_token, stage_flops
from journey_dist.memory.estimate import PRECISIONS, estimate_memory, model_state_bytes, param_count
from journey_dist.memory.sizes import active_param_count, expert_param_count, model_tensors
from journey_dist.mesh import all_groups
from journey_dist.model import GPT
from journey_dist.parallel.context.accounting import check_context_parallel, kv_block_bytes, layer_comm
from journey_dist.parallel.context.layout import SequenceLayout, attention_work, imbalance
from journey_dist.parallel.context.parallelize import dp_cp_ranks
from journey_dist.parallel.expert.layer import expert_group_ranks
from journey_dist.parallel.pipeline.orders import bubble_formula
from journey_dist.plan import make_plan
from journey_dist.search import LONG_SEQ, dp_for, search_layouts
from journey_dist.steptime import collective_time, group_ranks_matrix, group_span, pipeline_time, predict_step

ROOT = Path(__file__).resolve().parents[1]


def _counted_flops(cfg, batch: int = 2) -> tuple[int, int, int]:
    """torch's FlopCounterMode over one forward + backward of GPT(cfg) on (batch, block_size)
    random ids: (FLOPs counted, tokens, seq)."""
    seq = cfg.block_size
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    return counter.get_total_flops(), batch * seq, seq


@pytest.mark.slow  # FlopCounterMode's first use imports a large part of torch (~5 s idle, 20 s loaded)
@pytest.mark.parametrize("preset", ["tiny", "llama-mini"])
def test_flops_equal_torch_flop_counter(preset):
    """Forward + backward FLOPs of the real model (eager attention: its matmuls are visible to the
    counter) equal model_flops_per_token x tokens, and the stage split adds up to it."""
    cfg = get_preset(preset).with_(attn_impl="eager", block_size=32)
    counted, tokens, seq = _counted_flops(cfg)
    assert counted == model_flops_per_token(cfg, seq) * tokens
    whole = stage_flops(cfg, tokens=tokens, seq=seq)
    assert whole["forward"] + whole["backward"] == counted
    split = [stage_flops(cfg, tokens=tokens, seq=seq, tp=2, pp=2, stage=s) for s in range(2)]
    assert 2 * sum(s["forward"] for s in split) == whole["forward"]  # tp=2: each rank half


@pytest.mark.parametrize("preset", ["gpt2-small", "llama3-8b", "llama3-70b"])
def test_flops_are_6n_plus_attention(preset):
    """6 x (the parameters a token's matmuls use) + 12 L s a d; embeddings' lookups, learned positions,
    norms and biases are not matmuls."""
    cfg = get_preset(preset)
    seq = cfg.block_size
    not_matmul = sum(p.numel for p in model_tensors(cfg) if not p.matrix or p.name.endswith("wpe.weight"))
    if not cfg.tie_embeddings:
        not_matmul += cfg.vocab_size * cfg.n_embd  # wte is a lookup; the untied lm_head is the matmul
    n_mm = param_count(cfg) - not_matmul
    attention = 12 * cfg.n_layer * seq * cfg.n_embd
    assert model_flops_per_token(cfg, seq) == 6 * n_mm + attention
    assert attention_share(cfg, seq) == pytest.approx(attention / (6 * n_mm + attention))
    full = stage_flops(cfg, tokens=seq, seq=seq, recompute="full")
    head = 2 * seq * cfg.vocab_size * cfg.n_embd
    assert full["recompute"] == full["forward"] - head  # every block again, not the head
    sel = stage_flops(cfg, tokens=seq, seq=seq, recompute="selective")
    assert sel["recompute"] == attention / 3 * seq  # attention's forward matmuls only


@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_alpha_beta_times(n):
    link, B = Link("x", 100e9, 3e-6), 2**30
    ring = pytest.approx(2 * (n - 1) / n * B / 100e9 + 2 * (n - 1) * 3e-6)
    assert collective_time("all_reduce", B, n, link) == ring
    gather = pytest.approx((n - 1) / n * B / 100e9 + 5 * (n - 1) * 3e-6)
    assert collective_time("all_gather", B, n, link, calls=5) == gather
    assert collective_time("reduce_scatter", B, n, link, efficiency=0.5) == pytest.approx(
        (n - 1) / n * B / 50e9 + (n - 1) * 3e-6)
    assert collective_time("send", B, 2, link, calls=3) == pytest.approx(B / 100e9 + 3 * 3e-6)
    assert collective_time("all_reduce", B, 1, link) == 0


@pytest.mark.parametrize("layout, gpn", [((2, 4, 2), 8), ((2, 4, 2), 4), ((4, 2, 2), 2), ((2, 3, 2), 4),
                                         ((4, 1, 4), 8)])
def test_group_span_is_mesh_placement(layout, gpn):
    dp, tp, pp = layout
    pcfg = ParallelConfig(dp=dp, tp=tp, pp=pp, microbatches=pp)
    for dim in ("tp", "dp", "pp"):
        groups = all_groups(dim, pcfg)
        nodes = max(len({r // gpn for r in g}) for g in groups)
        assert group_span(dim, pcfg, gpn) == (-(-len(groups[0]) // nodes), nodes), dim


def test_link_follows_placement():
    h100 = get_cluster("h100")
    assert h100.link_for(8, 1) == h100.intra  # one node: NVLink
    assert h100.link_for(1, 4).bandwidth == h100.inter.bandwidth  # one GPU per node: its NIC
    assert h100.link_for(4, 2).bandwidth == 4 * h100.inter.bandwidth  # 4 NICs at once
    # tp=8 stays in a node, dp strides across nodes, one GPU of each group per node
    pcfg = ParallelConfig(dp=4, tp=8, microbatches=2)
    st = predict_step(get_preset("llama3-8b"), pcfg, h100, batch=8, seq=4096)
    tp = next(t for t in st.terms if t.name.startswith("tp "))
    assert "NVLink4" in tp.detail


def test_pipeline_time_and_bubble():
    assert pipeline_time([1.0] * 4, 8) == (8 + 4 - 1) * 1.0
    bubble = pipeline_time([1.0] * 4, 8) - 8 * 1.0
    assert bubble / pipeline_time([1.0] * 4, 8) == pytest.approx(bubble_formula("1f1b", 4, 8))
    assert pipeline_time([1.0, 2.0], 4) == 3 * 2.0 + 3.0  # the slowest stage sets the pace
    assert pipeline_time([1.0] * 4, 8, virtual_stages=3) == pytest.approx(8 + 3 / 3)


def test_step_terms_add_up_and_overlap_hides_dp():
    cfg, h100 = get_preset("llama3-8b"), get_cluster("h100")
    pcfg = ParallelConfig(dp=16, tp=4, microbatches=4)
    kw = dict(batch=64, seq=4096, dtype="bf16-mixed", recompute="full")
    hidden, exposed = predict_step(cfg, pcfg, h100, **kw), predict_step(cfg, pcfg, h100, overlap=False, **kw)
    for st in (hidden, exposed):
        assert st.step_s == pytest.approx(sum(t.seconds for t in st.terms))
        flops = model_flops_per_token(cfg, 4096) * 64 * 4096
        assert st.mfu == pytest.approx(flops / (st.step_s * 64 * 989e12))
        assert st.hfu > st.mfu  # recompute's extra forward
    dp_h, dp_e = hidden.term("dp all_reduce"), exposed.term("dp all_reduce")
    hidden_s = next(t.hidden for t in hidden.terms if t.name.startswith("dp"))
    assert dp_h < dp_e and dp_h + hidden_s == pytest.approx(dp_e)


def test_plan_dp_bytes_are_every_gradient_for_llama():
    """journey plan used to size Llama's dp all-reduce with GPT-2's layer shapes."""
    cfg = get_preset("llama-mini")
    plan = make_plan(cfg, ParallelConfig(dp=2), batch=8, dtype="fp32")
    assert plan["stages"][0]["comm"]["dp"]["all_reduce"]["bytes"] == 4 * sum(
        p.numel() for p in GPT(cfg).parameters())


def test_plan_dp_cp_bytes_are_every_gradient_at_its_width():
    """Under cp the gradients cross dp x cp (the cp group when dp = 1, after the loss's 8 bytes per
    micro-batch) at the gradients' width: fp32 main grads for bf16-megatron, not the residual's 2."""
    cfg = get_preset("llama-mini")
    n = sum(p.numel() for p in GPT(cfg).parameters())
    for dp, group, loss in ((2, "dp_cp", 0), (1, "cp", 8 * 2)):
        plan = make_plan(cfg, ParallelConfig(dp=dp, cp=2, microbatches=2), batch=4, dtype="bf16-megatron")
        assert plan["stages"][0]["comm"][group]["all_reduce"]["bytes"] == loss + 4 * n


def test_search_results_fit_and_rank():
    cfg, cluster = get_preset("llama3-8b"), get_cluster("h100", memory_gb=40)
    result = search_layouts(cfg, cluster, gpus=8, seq=4096, batch=64)
    assert result.ranked and result.skipped.get("does not fit 37.25 GiB")  # some layouts are rejected
    steps = [c.step.step_s for c in result.ranked]
    assert steps == sorted(steps)
    for c in result.ranked[:6]:
        p = c.pcfg
        assert p.world_size == 8 and 64 == p.dp * p.microbatches * c.micro_batch
        peaks = [estimate_memory(cfg, batch_size=64, seq_len=4096, dtype="bf16-mixed", dp=p.dp, zero=p.zero,
                                 tp=p.tp, pp=p.pp, microbatches=p.microbatches,
                                 sequence_parallel=p.sequence_parallel, recompute=c.recompute == "full",
                                 stage=s).total for s in range(p.pp)]
        assert c.peak == max(peaks) <= 40e9


def test_bad_cluster_and_search_input():
    with pytest.raises(ConfigError, match="unknown GPU 'v100'; use one of a100, h100, h200, cpu-gloo"):
        get_cluster("v100")
    with pytest.raises(ConfigError, match="64 GPUs do not factor .* tp=8, pp=3: 64 is not a multiple of 24; "
                                          r"use pp in \[1, 2, 4, 8\]"):
        dp_for(64, 8, 3)
    with pytest.raises(ConfigError, match="no layout of 8 GPUs fits in 74.51 GiB .* use more GPUs"):
        search_layouts(get_preset("llama3-405b"), get_cluster("h100"), gpus=8, seq=8192, batch=8)
    with pytest.raises(ConfigError, match="unknown cluster setting 'nvlink'"):
        get_cluster("h100", nvlink=900)
    with pytest.raises(ConfigError, match="compute_efficiency=1.5 must be a fraction"):
        get_cluster("a100", compute_efficiency=1.5)


def test_cluster_file_round_trip(tmp_path):
    cluster = get_cluster("h100", inter_gb_s=25, gpus_per_node=4)
    path = tmp_path / "c.toml"
    path.write_text(cluster_toml(cluster, "h100"))
    assert load_cluster(path) == cluster
    path.write_text('base = "h100"\nlinks = 3\n')
    with pytest.raises(ConfigError, match="unknown cluster setting 'links'"):
        load_cluster(path)
    assert parse_count("4M") == 4e6 and parse_count("4Mi") == 4 * 2**20 and parse_count("15T") == 15e12


def test_cpu_gloo_is_the_committed_calibration():
    """The preset's numbers are the benchmark's (benchmarks/plan_validation_cpu.py writes them)."""
    committed = json.loads((ROOT / "benchmarks/results/calibration_cpu.json").read_text())["cluster"]
    preset = CLUSTERS["cpu-gloo"].to_dict()
    for key in ("peak_flops", "memory_bandwidth", "compute_efficiency", "shared_cores"):
        assert math.isclose(preset[key], committed[key], rel_tol=1e-3), key
    for key in ("bandwidth", "latency"):
        assert math.isclose(preset["intra"][key], committed["intra"][key], rel_tol=1e-3), key


def test_unloaded_time_removes_waiting_for_a_cpu():
    start = [Sample(10.0, 1.0, 2.0), Sample(10.0, 5.0, 0.0)]
    end = [Sample(11.0, 1.2, 2.6), Sample(10.5, 5.4, 0.2)]  # 0.6 s on a CPU, 0.8 s waiting for one
    assert unloaded(start, end) == pytest.approx(1.0 * 0.6 / 1.4)
    assert unloaded([Sample(0, 0, 0)], [Sample(2, 0, 0)]) == 2  # no schedstat: plain wall time
    busy = sample()
    sum(i * i for i in range(200_000))
    assert sample().cpu > busy.cpu  # Linux: this thread's time on a CPU is counted


def test_journey_calibrate_writes_a_cluster_file(tmp_path, monkeypatch, capsys):
    measured = get_cluster("cpu-gloo", peak_tflops=0.05, compute_efficiency=0.5)
    fake = (measured, {"allreduce": {"latency": 1e-4, "bandwidth": 2e9}, "step": {"efficiency": 0.5}})
    monkeypatch.setattr("journey_dist.cli.calibrate", lambda repeats: fake)
    assert main(["calibrate", "--out", str(tmp_path), "--repeats", "3"]) == 0
    written = load_cluster(tmp_path / "calibrate" / "cpu-gloo.toml")
    assert _flat(written) == pytest.approx(_flat(measured), rel=1e-9)
    record = json.loads((tmp_path / "calibrate" / "calibration.json").read_text())
    assert record["cluster"]["peak_flops"] == 5e10
    assert "50.00 GFLOP/s" in capsys.readouterr().out


def test_cli_time_and_search(capsys):
    args = ["plan", "--preset", "llama3-8b", "--gpus", "16", "--gpu", "h100", "--seq", "4096",
            "--batch", "64", "--tp", "4", "--pp", "2", "--microbatches", "8", "--recompute", "full",
            "--train-tokens", "1T"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tp group of 4: inside one node -> NVLink4" in out and "dp group of 2: inside one node" in out
    assert "pp group of 2: across 2 nodes, 1 per node -> IB NDR 400G" in out
    assert "pipeline bubble (1f1b)" in out and "1e+12 tokens" in out and "GPU-hours" in out
    assert main(["plan", "--preset", "gpt2-small", "--gpus", "8", "--gpu", "a100", "--batch", "64",
                 "--search", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "fastest first" in out and "#1 vs #2" in out
    assert main(["plan", "--gpus", "6", "--tp", "4", "--gpu", "h100"]) == 2
    assert "6 GPUs do not factor" in capsys.readouterr().err


def test_search_honours_every_flag(capsys):
    """No flag is silently ignored: fixed choices narrow the search, flags without a use are errors."""
    base = ["plan", "--preset", "gpt2-small", "--gpus", "8", "--gpu", "a100", "--batch", "64", "--search"]
    assert main([*base, "--tp", "2", "--sp", "--microbatches", "8", "--recompute", "none", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["parallel"]["tp"] == 2 and r["parallel"]["sequence_parallel"] for r in rows)
    assert all(r["parallel"]["microbatches"] == 8 and r["recompute"] == "none" for r in rows)
    assert main([*base, "--gpu-mem", "100MB"]) == 2  # the search's memory limit: nothing fits
    assert "no layout of 8 GPUs fits in 95.37 MiB" in capsys.readouterr().err
    for flags, message in ((["--top", "3"], "--top says how many layouts --search prints"),
                           (["--train-tokens", "1T"], "also give --gpu NAME"),
                           (["--gpus", "8", "--world", "4"], "--world 4 and --gpus 8 disagree")):
        assert main(["plan", *flags]) == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- mixture of experts


def test_moe_flops_equal_torch_flop_counter():
    """moe-mini with a shared expert: the router, k experts per token and the shared expert, counted
    from the shapes, equal FlopCounterMode's forward + backward (no token dropped: whatever the
    routing, the experts take t k rows). Under tp the MoE runs whole on both ranks."""
    cfg = get_preset("moe-mini").with_(attn_impl="eager", block_size=16, n_layer=2, moe_shared_hidden=64)
    counted, tokens, seq = _counted_flops(cfg)
    assert counted == model_flops_per_token(cfg, seq) * tokens
    whole = stage_flops(cfg, tokens=tokens, seq=seq)
    assert whole["forward"] + whole["backward"] == counted
    layer = layer_forward_flops(cfg, tokens, seq)
    moe = layer["router"] + layer["experts"] + layer["shared"]
    assert layer["experts"] == 2 * tokens * cfg.moe_top_k * (2 * 128 * 256)  # k experts of c_fc + c_proj
    tp2 = stage_flops(cfg, tokens=tokens, seq=seq, tp=2)
    assert 2 * tp2["forward"] == whole["forward"] + cfg.n_layer * moe  # the MoE on both tp ranks


def test_moe_flops_are_6n_active_plus_attention():
    """6 x the active parameters' matrices (memory.sizes.active_param_count: the router, k experts)
    + attention: the E - k experts a token skips cost nothing."""
    cfg = get_preset("mixtral-mini")  # no biases: every non-norm parameter but wte is a matmul weight
    seq = cfg.block_size
    not_matmul = sum(p.numel for p in model_tensors(cfg) if not p.matrix) + cfg.vocab_size * cfg.n_embd
    active_mm = active_param_count(cfg) - not_matmul
    assert model_flops_per_token(cfg, seq) == 6 * active_mm + 12 * cfg.n_layer * seq * cfg.n_embd
    assert active_param_count(cfg) < param_count(cfg)


@pytest.mark.parametrize("layout", [(16, 1, 8, 8), (8, 2, 2, 4), (4, 2, 4, 4), (8, 1, 2, 8), (4, 1, 4, 2)])
def test_expert_group_span_is_expert_parallel_placement(layout):
    """ep and edp groups placed as parallel/expert/layer.py cuts each dp group of mesh.py."""
    dp, tp, ep, gpn = layout
    pcfg = ParallelConfig(dp=dp, tp=tp, ep=ep)
    eps, edps = zip(*(expert_group_ranks(g, ep) for g in all_groups("dp", pcfg)))
    for dim, groups in (("ep", [g for gs in eps for g in gs]), ("edp", [g for gs in edps for g in gs])):
        nodes = max(len({r // gpn for r in g}) for g in groups)
        assert group_span(dim, pcfg, gpn) == (-(-len(groups[0]) // nodes), nodes), dim


def test_expert_all_to_all_is_alpha_beta_on_the_ep_link():
    """mixtral-mini on 16 H100s, dp=16, ep=8: the ep group (8 consecutive ranks) stays on NVLink, the
    edp group (ranks 8 apart) crosses the network. Each term is the alpha-beta formula on its link
    with the bytes of planned_comm's even load: 4 L m calls of t k C values (dispatch, combine and
    their backward), L m calls of E int64 counts."""
    cfg, h100 = get_preset("mixtral-mini"), get_cluster("h100")
    pcfg = ParallelConfig(dp=16, ep=8, microbatches=2)
    batch, seq, m, L = 64, 128, 2, cfg.n_layer
    st = predict_step(cfg, pcfg, h100, batch=batch, seq=seq, overlap=False)
    t, v = batch // (16 * m) * seq, PRECISIONS["bf16-mixed"].residual
    eff = h100.comm_efficiency
    tokens = collective_time("all_to_all", 4 * L * m * t * cfg.moe_top_k * cfg.n_embd * v, 8, h100.intra,
                             calls=4 * L * m, efficiency=eff)
    assert st.term("ep all_to_all tokens") == pytest.approx(tokens)
    counts = collective_time("all_to_all", L * m * 8 * cfg.n_experts, 8, h100.intra, calls=L * m,
                             efficiency=eff)
    assert st.term("ep all_to_all counts") == pytest.approx(counts)
    g = model_state_bytes(1, "bf16-mixed")["grads"]
    edp = collective_time("all_reduce", expert_param_count(cfg, 8) * g, 2, h100.link_for(1, 2),
                          efficiency=eff)
    assert st.term("edp all_reduce expert grads") == pytest.approx(edp)
    dense = (param_count(cfg, ep=8) - expert_param_count(cfg, 8)) * g
    assert st.term("dp all_reduce dense grads") == pytest.approx(
        collective_time("all_reduce", dense, 16, h100.link_for(8, 2), efficiency=eff))
    assert st.step_s == pytest.approx(sum(x.seconds for x in st.terms))
    assert st.mfu == pytest.approx(model_flops_per_token(cfg, seq) * batch * seq / (st.step_s * 16 * 989e12))


def test_search_enumerates_ep_and_respects_a_fixed_ep(capsys):
    cfg, h100 = get_preset("moe-mini"), get_cluster("h100")
    free = search_layouts(cfg, h100, gpus=8, seq=128, batch=64)
    assert {c.pcfg.ep for c in free.ranked} == {1, 2, 4, 8}  # every divisor of dp=8 and E=8
    for c in free.ranked:
        p = c.pcfg
        assert p.dp % p.ep == 0 and cfg.n_experts % p.ep == 0 and p.zero == 0 and p.pp == 1
        assert c.peak == estimate_memory(cfg, batch_size=64, seq_len=128, dtype="bf16-mixed", dp=p.dp,
                                         tp=p.tp, microbatches=p.microbatches,
                                         recompute=c.recompute == "full", ep=p.ep).total <= h100.memory
    fixed = search_layouts(cfg, h100, gpus=8, seq=128, batch=64, ep=2)
    assert fixed.ranked and all(c.pcfg.ep == 2 for c in fixed.ranked)
    args = ["plan", "--preset", "moe-mini", "--gpus", "8", "--gpu", "h100", "--batch", "64", "--search"]
    assert main([*args, "--ep", "4", "--json"]) == 0
    assert all(r["parallel"]["ep"] == 4 for r in json.loads(capsys.readouterr().out))


def _flat(cluster) -> dict:
    """A cluster's numbers by name (links' too), to compare what a file reads back up to float rounding
    (0.03339 TB/s x 1e12 is 33390000000.000004 B/s)."""
    out = {}
    for key, value in cluster.to_dict().items():
        if isinstance(value, dict):
            out |= {f"{key}.{k}": v for k, v in value.items() if not isinstance(v, str)}
        elif not isinstance(value, str):
            out[key] = value
    return out


# ----------------------------------------------------------------------------- context parallel


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_flops_are_the_busiest_ranks_share_of_the_counted_work(cp):
    """A cp rank runs tokens / cp through the linears and the head, and the busiest rank's share of
    attention: layout.attention_work's max over sum (plain ring: imbalance 2cp / (cp + 1) over the
    mean; zigzag: 1 / cp); Ulysses holds a / cp heads of every token (1 / cp)."""
    cfg, seq, b = get_preset("llama-mini"), 128, 3
    whole = layer_forward_flops(cfg, b * seq, seq)
    for design, kind in (("ring", "plain"), ("zigzag", "zigzag"), ("ulysses", None)):
        fl = layer_forward_flops(cfg, b * seq, seq, cp=cp, cp_design=design)
        assert fl["linears"] == pytest.approx(whole["linears"] / cp)
        share = 1 / cp
        if kind is not None:
            work = attention_work(SequenceLayout(cp, kind), seq, batch=b, heads=cfg.n_head,
                                  head_dim=cfg.head_dim)
            share = max(w["flops"] for w in work) / sum(w["flops"] for w in work)
            assert share == pytest.approx(imbalance(work) / cp)
        assert fl["attention"] == pytest.approx(whole["attention"] * share), design
    ring = layer_forward_flops(cfg, b * seq, seq, cp=cp, cp_design="ring")["attention"]
    assert ring * cp / whole["attention"] == pytest.approx(2 * cp / (cp + 1))  # the plain split's imbalance
    st = stage_flops(cfg, tokens=b * seq, seq=seq, cp=cp, cp_design="zigzag")
    assert st["forward"] == pytest.approx(stage_flops(cfg, tokens=b * seq, seq=seq)["forward"] / cp)


@pytest.mark.parametrize("layout", [(2, 4, 2, 8), (2, 2, 4, 8), (4, 2, 1, 4), (1, 8, 8, 8), (2, 8, 4, 8)])
def test_cp_and_dp_cp_group_span_is_mesh_placement(layout):
    """cp groups are mesh.py's (cp ranks tp apart); the gradient group is every dp and cp rank of a
    (pp, tp) slot, as parallel/context/parallelize.dp_cp_ranks builds it."""
    dp, cp, tp, gpn = layout
    pcfg = ParallelConfig(dp=dp, cp=cp, tp=tp, pp=2, microbatches=2)
    dp_cp = sorted({tuple(dp_cp_ranks(r, pcfg)) for r in range(pcfg.world_size)})
    for dim, groups in (("cp", all_groups("cp", pcfg)), ("dp", all_groups("dp", pcfg)), ("dp_cp", dp_cp)):
        assert sorted(map(tuple, group_ranks_matrix(dim, pcfg).tolist())) == sorted(map(tuple, groups)), dim
        nodes = max(len({r // gpn for r in g}) for g in groups)
        assert group_span(dim, pcfg, gpn) == (-(-len(groups[0]) // nodes), nodes), dim


def test_cp_terms_are_alpha_beta_on_the_cp_link():
    """llama3.1-8b on 64 H100s, tp=8 in a node, so a cp group puts one rank on each of cp nodes (IB).
    Ring (zigzag): cp - 1 k/v sends forward and 2cp - 1 backward per layer and micro-batch, each
    exposed by max(0, send - W), W = one layer's attention forward / cp: 2K-token sequences expose
    them, 32K ones hide them (W grows as S^2, a block as S). Ulysses: 8 all-to-alls per layer,
    exposed. Gradients: one all-reduce over dp x cp."""
    cfg, h100 = get_preset("llama3.1-8b"), get_cluster("h100")
    eff, rate, ib8 = h100.comm_efficiency, h100.rank_flops(8), h100.link_for(1, 8)
    g = model_state_bytes(1, "bf16-mixed")["grads"]
    for seq, exposed in ((2048, True), (32768, False)):
        pcfg = ParallelConfig(dp=1, cp=8, tp=8, microbatches=2, cp_design="zigzag")
        st = predict_step(cfg, pcfg, h100, batch=2, seq=seq, overlap=False)
        kv = kv_block_bytes(cfg, 8, micro_batch=1, seq_len=seq, tp=8, bytes_per_value=2)
        W = layer_forward_flops(cfg, seq, seq, 8, 8, "zigzag")["attention"] / (8 * rate)
        for what, hops in (("k/v forward", 7), ("k/v + dK/dV backward", 15)):
            calls = hops * 2 * cfg.n_layer
            whole = collective_time("send", calls * kv, 8, ib8, calls=calls, efficiency=eff)
            term = next(t for t in st.terms if t.name.startswith(f"cp send {what}"))
            assert term.seconds == pytest.approx(calls * max(0.0, whole / calls - W))
            assert term.seconds + term.hidden == pytest.approx(whole)
            assert (term.seconds > 0) == exposed
        grads = param_count(cfg, 8) * g
        assert st.term("dp_cp all_reduce grads") == pytest.approx(collective_time(
            "all_reduce", grads, 8, ib8, calls=math.ceil(grads / (25 * 2**20)), efficiency=eff))
        assert st.step_s == pytest.approx(sum(t.seconds for t in st.terms))
    # recompute runs attention's forward again, and with it the forward's k/v sends
    full = predict_step(cfg, pcfg, h100, batch=2, seq=2048, overlap=False, recompute="full")
    again = next(t for t in full.terms if t.name.startswith("cp send k/v recompute"))
    forward = next(t for t in full.terms if t.name.startswith("cp send k/v forward"))
    assert again.seconds == pytest.approx(forward.seconds) and again.seconds > 0
    assert "cp send k/v recompute" not in " ".join(t.name for t in st.terms)
    pcfg = ParallelConfig(dp=2, cp=4, tp=8, microbatches=2, cp_design="ulysses")
    a2a = layer_comm(cfg, "ulysses", 4, micro_batch=1, seq_len=8192, tp=8, bytes_per_value=2)["all_to_all"]
    for recompute, passes in (("none", 8), ("full", 12)):  # 4 forward, 4 backward, the forward again
        st = predict_step(cfg, pcfg, h100, batch=4, seq=8192, overlap=False, recompute=recompute)
        assert st.term("cp all_to_all") == pytest.approx(collective_time(
            "all_to_all", a2a["bytes"] / 8 * passes * 2 * cfg.n_layer, 4, h100.link_for(1, 4),
            calls=passes * 2 * cfg.n_layer, efficiency=eff))
    grads = param_count(cfg, 8) * g
    assert st.term("dp_cp all_reduce grads") == pytest.approx(collective_time(  # 8 ranks, 8 apart
        "all_reduce", grads, 8, ib8, calls=math.ceil(grads / (25 * 2**20)), efficiency=eff))


def test_search_enumerates_cp_and_respects_a_fixed_cp(capsys):
    cfg, h100 = get_preset("llama-mini", block_size=LONG_SEQ), get_cluster("h100")
    kw = dict(gpus=8, seq=LONG_SEQ, batch=8, micro_batches=(1,), recomputes=("full",))
    free = search_layouts(cfg, h100, **kw)
    assert {c.pcfg.cp for c in free.ranked} == {1, 2, 4, 8}
    assert {c.pcfg.cp_design for c in free.ranked if c.pcfg.cp > 1} == {"zigzag", "ulysses"}
    for c in free.ranked:
        p = c.pcfg
        assert p.world_size == 8 and (p.cp == 1 or p.zero == 0)
        check_context_parallel(p, cfg, LONG_SEQ)
        peaks = [estimate_memory(cfg, batch_size=8, seq_len=LONG_SEQ, dtype="bf16-mixed", dp=p.dp,
                                 zero=p.zero,
                                 tp=p.tp, pp=p.pp, microbatches=p.microbatches,
                                 sequence_parallel=p.sequence_parallel, recompute=True, stage=s, cp=p.cp,
                                 cp_design=p.cp_design).total for s in range(p.pp)]
        assert c.peak == max(peaks) <= h100.memory
    assert {c.pcfg.cp for c in search_layouts(cfg, h100, **{**kw, "seq": LONG_SEQ // 2}).ranked} == {1}
    fixed = search_layouts(cfg, h100, **kw, cp=2, cp_design="ring")
    assert fixed.ranked and all((c.pcfg.cp, c.pcfg.cp_design) == (2, "ring") for c in fixed.ranked)
    with pytest.raises(ConfigError, match="cp=3 must be a positive integer dividing the 8 GPUs"):
        search_layouts(cfg, h100, **kw, cp=3)
    args = ["plan", "--preset", "llama3.1-8b", "--gpus", "16", "--gpu", "h100", "--seq", "131072",
            "--batch", "4", "--search", "--recompute", "full", "--tp", "8"]
    assert main([*args, "--cp", "2", "--json"]) == 0
    assert all(r["parallel"]["cp"] == 2 for r in json.loads(capsys.readouterr().out))
    assert main(["plan", "--preset", "gpt-mini", "--cp-design", "zigzag"]) == 2  # no --cp: not ignored
    assert "--cp-design zigzag says how --cp splits each sequence; add --cp N" in capsys.readouterr().err
