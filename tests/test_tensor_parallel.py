"""Tensor parallel on 2 gloo ranks equals one process; so does PyTorch's DTensor TP; both families.

One spawn runs every check for GPT-2 and the Llama family (tests/families.py: GQA with 2 kv heads,
so tp=2 splits k/v by kv heads; SwiGLU; RoPE; RMSNorm; untied head), module-scoped.
Tolerances, fp32: forward logits/loss and first-step gradients within 1e-6 (sums of partial
products over 2 shards vs one matmul differ by rounding, measured ~1e-7); parameters and losses
after 5 AdamW steps within 1e-5 (measured ~2e-6). AdamW ignores a constant grad scale, so grads
are compared too.
"""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from journey_dist.comm import CommLedger
from journey_dist.config import ConfigError, GPTConfig, ParallelConfig
from journey_dist.data import load_tokens
from journey_dist.memory.estimate import estimate_memory, param_count
from journey_dist.model import GPT
from journey_dist.parallel.tensor.dtensor import (
    dtensor_analytic_collectives,
    dtensor_hooks,
    dtensor_step,
    run_dtensor_tp,
)
from journey_dist.parallel.tensor.layers import VocabParallelEmbedding, vocab_parallel_cross_entropy
from journey_dist.parallel.tensor.mappings import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence,
    reduce_from_region,
    scatter_to_region,
    scatter_to_sequence,
)
from journey_dist.parallel.tensor.parallelize import (
    analytic_collectives,
    gather_grads,
    gather_params,
    parallelize,
    parallelize_block,
    run_tensor_parallel,
    sync_sequence_parallel_grads,
)
from journey_dist.parity import fresh_model, max_abs_diff, named_params, reference_run
from journey_dist.train import TrainConfig, make_optimizer, train_step
from tests.dist import run_ranks
from tests.families import FAMILIES, tiny

TOL = 1e-5  # params and losses after 5 AdamW steps
FWD_TOL = 1e-6  # logits, loss, first-step grads
CONFIGS = {f: tiny(f, vocab_size=64, block_size=16) for f in FAMILIES}
TRAIN_CONFIGS = {f: c.with_(vocab_size=256) for f, c in CONFIGS.items()}  # byte-level corpus
TINY, TRAIN_CFG = CONFIGS["gpt2"], TRAIN_CONFIGS["gpt2"]
CFG = TrainConfig(steps=5, batch_size=8, lr=3e-3, warmup_steps=1, grad_clip=1.0, eval_batches=1)


def _gather_last(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-1)


def _forward_backward(config: GPTConfig, sp: bool, pad_vocab: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (4, config.block_size), generator=gen)
    tgt = torch.randint(0, config.vocab_size, (4, config.block_size), generator=gen)
    tgt[0, :3] = -1  # ignored positions
    ref = fresh_model(config)
    logits, loss = ref(idx, tgt)
    loss.backward()
    tp = parallelize(fresh_model(config), sequence_parallel=sp, pad_vocab=pad_vocab)
    before = max_abs_diff(gather_params(tp), named_params(ref))
    local, tp_loss = tp(idx, tgt)
    tp_loss.backward()
    tp.sync_grads()
    full = _gather_last(local)[..., :config.vocab_size]
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1e9)
    tp_norm = tp.hooks().clip(list(tp.parameters()), 1e9)
    losses = torch.tensor([tp_loss.item()])
    dist.all_reduce(losses, op=dist.ReduceOp.MAX)
    return {"params": before, "logits": (full - logits).abs().max().item(),
            "loss": abs(tp_loss.item() - loss.item()), "loss_spread": losses.item() - tp_loss.item(),
            "grads": max_abs_diff(gather_grads(tp), {n: p.grad for n, p in ref.named_parameters()}),
            "norm": abs(tp_norm.item() - ref_norm.item()), "local_vocab": local.size(-1)}


def _cross_entropy() -> dict:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(24, 10, generator=gen) * 3  # vocab 10 padded to 10 (tp 2)
    targets = torch.randint(0, 10, (24,), generator=gen)
    targets[:4] = -1
    ref_in = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_in, targets, ignore_index=-1)
    ref.backward()
    r, n = dist.get_rank(), dist.get_world_size()
    local = logits.chunk(n, dim=-1)[r].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets)
    loss.backward()
    # padded: vocab 9 in a table of 10, the padded column masked out of the loss
    ref9_in = logits[:, :9].clone().requires_grad_()
    ref9 = F.cross_entropy(ref9_in, targets.clamp(max=8).masked_fill(targets < 0, -1), ignore_index=-1)
    ref9.backward()
    local9 = logits.chunk(n, dim=-1)[r].clone().requires_grad_()
    loss9 = vocab_parallel_cross_entropy(local9, targets.clamp(max=8).masked_fill(targets < 0, -1),
                                         vocab_size=9)
    loss9.backward()
    grad9 = _gather_last(local9.grad)
    return {"loss": abs(loss.item() - ref.item()),
            "grad": (local.grad - ref_in.grad.chunk(n, dim=-1)[r]).abs().max().item(),
            "loss9": abs(loss9.item() - ref9.item()),
            "grad9": (grad9[:, :9] - ref9_in.grad).abs().max().item(),
            "pad_grad": grad9[:, 9:].abs().max().item()}


def _ledger(config, sp: bool) -> dict:
    idx = torch.randint(0, 64, (4, 16))
    tp = parallelize(fresh_model(config), sequence_parallel=sp)
    opt = make_optimizer(tp, CFG)
    with CommLedger() as ledger:
        train_step(tp, opt, [(idx, idx)], tp.hooks(), grad_clip=1.0)
    measured = {op: {"calls": ledger.calls(op), "bytes": ledger.total_bytes(op)}
                for op in ("all_reduce", "all_gather", "reduce_scatter") if ledger.calls(op)}
    expected = analytic_collectives(config, 2, idx.numel(), sequence_parallel=sp)
    return {"measured": measured, "analytic": expected, "all_calls": ledger.calls()}


def _pieces() -> dict:
    out = {}
    x = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y = gather_from_sequence(scatter_to_sequence(x))  # round trip: identity fwd, grad x t (AG/RS)
    y.sum().backward()
    out["seq_round_trip"] = (y - x).abs().max().item()
    out["seq_grad"] = (x.grad - dist.get_world_size()).abs().max().item()  # each rank's ones summed
    n = dist.get_world_size()
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(6), requires_grad=True)
    y = gather_from_region(scatter_to_region(z))  # split then gather the last dim: identity
    (y * torch.arange(8.0)).sum().backward()  # backward: split then all-gather the gradient
    out["last_round_trip"] = (y - z).abs().max().item()
    out["last_grad"] = (z.grad - torch.arange(8.0)).abs().max().item()
    z.grad = None
    reduce_from_region(copy_to_region(z)).sum().backward()  # f then g: n*z, grad all-reduced: n
    out["fg_grad"] = (z.grad - n).abs().max().item()
    torch.manual_seed(4)  # the same table and ids on every rank
    wte = torch.nn.Embedding(64, 8)
    emb = VocabParallelEmbedding.from_dense(wte, None)
    ids = torch.randint(0, 64, (3, 5))
    out["embedding"] = (emb(ids) - wte(ids)).abs().max().item()
    for family, config in CONFIGS.items():
        block = fresh_model(config).transformer.h[0]
        torch.manual_seed(5)  # the same input on every rank
        h = torch.randn(2, 16, 32)
        tp_block = parallelize_block(block, None, sequence_parallel=True)
        local = tp_block(h.chunk(2, dim=1)[dist.get_rank()])
        full = block(h)
        w = torch.randn(full.shape)
        (full * w).sum().backward()  # the loss summed over every position ...
        (local * w.chunk(2, dim=1)[dist.get_rank()]).sum().backward()  # ... = the sum of each shard's
        sync_sequence_parallel_grads(tp_block, dist.group.WORLD)
        out[family] = {"block_sp": (local - full.chunk(2, dim=1)[dist.get_rank()]).abs().max().item(),
                       "block_sp_grads": max_abs_diff(gather_grads(tp_block, dist.group.WORLD),
                                                      {n: p.grad for n, p in block.named_parameters()}),
                       "block_grad_max": max(p.grad.abs().max().item() for p in block.parameters())}
    errors = []
    mqa = CONFIGS["llama"].with_(n_kv_head=1)  # one kv head cannot be split over 2 ranks
    for bad in (TINY.with_(n_head=1, n_embd=32), TINY.with_(vocab_size=63), mqa):
        try:
            parallelize(GPT(bad))
        except ConfigError as e:
            errors.append(str(e))
    out["errors"] = errors
    try:  # a block alone (as a 3D stage builds it) checks the kv heads too
        parallelize_block(GPT(mqa).transformer.h[0])
    except ConfigError as e:
        out["block_error"] = str(e)
    return out


def _family(family: str, data) -> dict:
    config, train_config = CONFIGS[family], TRAIN_CONFIGS[family]
    out = {}
    tp = parallelize(fresh_model(config))
    out["param_bytes"] = {"fp32": sum(p.numel() * p.element_size() for p in tp.parameters())}
    tp.to(torch.bfloat16)
    out["param_bytes"]["bf16"] = sum(p.numel() * p.element_size() for p in tp.parameters())
    for sp in (False, True):
        out[f"fwd_sp{sp}"] = _forward_backward(config, sp)
        out[f"ledger_sp{sp}"] = _ledger(config, sp)
    out["fwd_pad"] = _forward_backward(config.with_(vocab_size=63), False, pad_vocab=True)
    ref = reference_run(train_config, data, CFG, first_grads=True)
    runs = {f"tp_sp{sp}": run_tensor_parallel(train_config, data, CFG, sequence_parallel=sp)
            for sp in (False, True)}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    runs["dtensor"] = run_dtensor_tp(train_config, data, CFG, mesh)
    for name, run in runs.items():
        out[name] = {"params": max_abs_diff(run.params, ref.params),
                     "grads": max_abs_diff(run.grads, ref.grads),
                     "loss": max(abs(a - b) for a, b in zip(run.losses, ref.losses))}
    model = runs["dtensor"].model  # one more step, its collectives counted by the ledger
    idx = torch.randint(0, 256, (CFG.batch_size, train_config.block_size))
    with CommLedger() as ledger:
        dtensor_step(model, make_optimizer(model, CFG), [(idx, idx)], dtensor_hooks(), grad_clip=1.0)
    out["ledger_dtensor"] = {"measured": {op: {"calls": ledger.calls(op), "bytes": ledger.total_bytes(op)}
                                          for op in ("all_reduce", "all_gather", "reduce_scatter")
                                          if ledger.calls(op)},
                             "analytic": dtensor_analytic_collectives(model, idx.numel())}
    out["ref_losses"] = ref.losses
    out["ref_grad_max"] = max(g.abs().max().item() for g in ref.grads.values())
    return out


def _everything() -> dict:
    data = load_tokens("handbook")
    return {"pieces": _pieces(), "ce": _cross_entropy(), **{f: _family(f, data) for f in FAMILIES}}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_everything, 2, timeout_s=240)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sp", [False, True])
def test_forward_logits_loss_and_every_gradient_equal_one_process(results, sp, family):
    for rank in results:
        r = rank[family][f"fwd_sp{sp}"]
        assert r["params"] == 0.0  # parallelize keeps exactly the plain weights
        assert r["local_vocab"] == TINY.vocab_size // 2  # logits stay split by vocabulary
        for key in ("logits", "loss", "grads", "norm"):
            assert r[key] < FWD_TOL, (sp, key, r[key])
        assert r["loss_spread"] == 0.0  # the same loss on every tp rank


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["tp_spFalse", "tp_spTrue", "dtensor"])
def test_training_equals_one_process_after_5_adamw_steps(results, name, family):
    ref = results[0][family]
    assert ref["ref_grad_max"] > 1e3 * FWD_TOL  # the grad check is not vacuous
    assert ref["ref_losses"][-1] < ref["ref_losses"][0]  # it really trained
    for rank in results:
        r = rank[family][name]
        assert r["grads"] < FWD_TOL, (name, r["grads"])
        assert r["params"] < TOL, (name, r["params"])
        assert r["loss"] < TOL, (name, r["loss"])


def test_vocab_parallel_cross_entropy_matches_torch_including_gradient_and_padding(results):
    for rank in results:
        ce = rank["ce"]
        assert ce["loss"] < FWD_TOL and ce["grad"] < FWD_TOL
        assert ce["loss9"] < FWD_TOL and ce["grad9"] < FWD_TOL
        assert ce["pad_grad"] == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_vocabulary_model_equals_one_process(results, family):
    r = results[0][family]["fwd_pad"]
    assert r["local_vocab"] == 32  # 63 padded to 64
    for key in ("logits", "loss", "grads"):
        assert r[key] < FWD_TOL, (key, r[key])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sp", [False, True])
def test_ledger_counts_equal_analytic(results, sp, family):
    r = results[0][family][f"ledger_sp{sp}"]
    assert r["measured"] == r["analytic"]
    assert r["all_calls"] == sum(row["calls"] for row in r["measured"].values())  # and no other collective
    if sp:  # every activation all-reduce became an all-gather + reduce-scatter pair
        assert r["measured"]["all_gather"]["calls"] == 4 * TINY.n_layer + 2
    else:
        assert r["measured"]["all_reduce"]["calls"] == 4 * TINY.n_layer + 2 + 3 + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_ledger_counts_dtensor_collectives_including_loss_parallel(results, family):
    r = results[0][family]["ledger_dtensor"]
    assert r["measured"] == r["analytic"]  # incl. loss_parallel's all-reduces inside DTensor dispatch


def test_building_blocks(results):
    for rank in results:
        p = rank["pieces"]
        assert p["seq_round_trip"] == 0.0 and p["seq_grad"] == 0.0
        assert p["last_round_trip"] == 0.0 and p["last_grad"] == 0.0 and p["fg_grad"] == 0.0
        assert p["embedding"] == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sequence_parallel_block_equals_the_dense_block(results, family):
    for rank in results:
        p = rank["pieces"][family]
        assert p["block_sp"] < FWD_TOL
        # incl. the norm grads all-reduced over tp; relative: these grads reach ~10
        assert p["block_sp_grads"] < FWD_TOL * p["block_grad_max"], p


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_parameter_bytes_equal_the_memory_estimate(results, family):
    # the parallelized model's own shards, per rank, against memory.estimate's Megatron split
    config = CONFIGS[family]
    for dtype in ("fp32", "bf16"):
        est = estimate_memory(config, batch_size=2, seq_len=16, dtype=dtype, tp=2).params
        assert [rank[family]["param_bytes"][dtype] for rank in results] == [est, est], dtype
    mine = results[0][family]["param_bytes"]["fp32"]
    assert mine == param_count(config, tp=2) * 4 < param_count(config) * 4


def test_config_errors_name_the_fix(results):
    heads, vocab, kv_heads = results[0]["pieces"]["errors"]
    assert "n_head=1" in heads and "tp in" in heads
    assert "vocab_size=63" in vocab and "pad_vocab=True" in vocab and "64" in vocab
    assert "tp=2 does not divide n_kv_head=1" in kv_heads and "n_kv_head a multiple of 2" in kv_heads
    assert "tp=2 must divide" in results[0]["pieces"]["block_error"]


def test_config_errors_before_any_process_group():
    with pytest.raises(ConfigError, match="n_head=4"):
        ParallelConfig(tp=3).validate(TINY)
    with pytest.raises(ConfigError, match=r"tp=4 does not divide n_kv_head=2.*use a tp in \[1, 2\]"):
        ParallelConfig(tp=4).validate(CONFIGS["llama"])
    with pytest.raises(ConfigError, match="pad"):
        ParallelConfig(tp=2).validate(TINY.with_(vocab_size=63))
    ParallelConfig(tp=2, pad_vocab=True).validate(TINY.with_(vocab_size=63))


def _four_ranks() -> dict:
    data = load_tokens("handbook")
    ref = reference_run(TRAIN_CFG, data, replace(CFG, steps=3), first_grads=True)
    run = run_tensor_parallel(TRAIN_CFG, data, replace(CFG, steps=3), sequence_parallel=True)
    return {"params": max_abs_diff(run.params, ref.params), "grads": max_abs_diff(run.grads, ref.grads)}


@pytest.mark.slow
def test_four_ranks_with_sequence_parallel_equal_one_process():
    for rank in run_ranks(_four_ranks, 4, timeout_s=300):
        assert rank["grads"] < FWD_TOL and rank["params"] < TOL, rank
