"""Tensor parallel, the two gaps closed: dropout RNG (tp_rng.py) and KV-cache generation (tp_generate.py).

One spawn of 2 gloo ranks runs every check for both families (module-scoped). Dropout: masks of
replicated regions are equal on both ranks, masks of per-rank regions (own heads; SP sequence
shards) differ; the loss is bitwise identical on both tp ranks at every step and replicated
parameters stay bitwise in sync, SP off and on; the same seed gives the same run twice.
Generation: greedy tokens equal the single-process GPT.generate's, logits (prefill + decode with
the cache) within 1e-5 (fp32; measured ~1e-7), a rank's cache is exactly kv_cache_bytes(...,
kv_heads=K/t) = 1/2 of one process's (K: GPT-2's 4 heads, the Llama config's 2 kv heads); sampling
with a different generator per rank still gives every rank the same tokens.
"""

import pytest
import torch
import torch.distributed as dist

from journey_dist.data import load_tokens
from journey_dist.memory.estimate import kv_cache_bytes
from journey_dist.model import KVCache
from journey_dist.parallel.tensor.generate import compare_tp_generation
from journey_dist.parallel.tensor.mappings import gather_from_region
from journey_dist.parallel.tensor.parallelize import parallelize, run_tensor_parallel
from journey_dist.parallel.tensor.rng import fork, get_tracker, model_parallel_seed
from journey_dist.parity import fresh_model
from journey_dist.train import TrainConfig
from tests.dist import run_ranks
from tests.families import FAMILIES, tiny

LOGIT_TOL = 1e-5
CONFIGS = {f: tiny(f, vocab_size=64, block_size=16) for f in FAMILIES}
TINY = CONFIGS["gpt2"]
# eager: the attention dropout is a module we can hook
DROPS = {f: c.with_(dropout=0.1, attn_impl="eager") for f, c in CONFIGS.items()}
CFG = TrainConfig(steps=3, batch_size=4, lr=3e-3, warmup_steps=1, grad_clip=1.0, eval_batches=1)


def _everyone(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _masks(config, sp: bool) -> dict:
    """Dropout masks of one training forward, per module, compared across the 2 ranks."""
    tp = parallelize(fresh_model(config), sequence_parallel=sp).train()
    masks, rates = {}, {}

    def hook(module, inp, out, name):
        live = inp[0] != 0  # causally masked attention probabilities are 0 before dropout
        masks[name] = (out == 0) & live  # dropped entries
        rates[name] = (masks[name].sum() / live.sum()).item()

    for name, m in tp.named_modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name))
    hidden = {}  # ln_f's output: replicated over the tp ranks without SP, a sequence shard with it
    tp.transformer.ln_f.register_forward_hook(lambda m, i, o: hidden.update(x=o.detach().clone()))
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (2, config.block_size), generator=gen)
    model_parallel_seed(7, dist.get_rank())
    _, loss = tp(idx, idx)
    after = torch.rand(4)  # the default stream after the forward: in step on both ranks?
    everyone = _everyone({"masks": masks, "after": after, "loss": loss.item(), "hidden": hidden["x"]})
    out = {"equal": {n: torch.equal(everyone[0]["masks"][n], everyone[1]["masks"][n]) for n in masks},
           "rate": rates,
           "default_in_step": torch.equal(everyone[0]["after"], everyone[1]["after"]),
           "loss_spread": abs(everyone[0]["loss"] - everyone[1]["loss"]),
           "hidden_equal": torch.equal(everyone[0]["hidden"], everyone[1]["hidden"])}
    # control: default streams seeded differently per rank make the "replicated" masks differ and
    # the replicated activations diverge (the vocab-parallel loss is still equal on both ranks:
    # it is all-reduced, so equal losses alone would not catch it; the parameter check does)
    model_parallel_seed(7 + dist.get_rank(), dist.get_rank())
    tp(idx, idx)
    hiddens = _everyone(hidden["x"])
    out["desynced_hidden_equal"] = torch.equal(hiddens[0], hiddens[1])
    get_tracker().reset()
    try:
        tp(idx, idx)
        out["unseeded_error"] = ""
    except RuntimeError as e:
        out["unseeded_error"] = str(e)
    return out


def _training(config, sp: bool, data) -> dict:
    cfg_model = config.with_(vocab_size=256)
    runs = [run_tensor_parallel(cfg_model, data, CFG, sequence_parallel=sp) for _ in range(2)]
    no_drop = run_tensor_parallel(cfg_model.with_(dropout=0.0), data, CFG, sequence_parallel=sp)
    a, b = runs
    everyone = _everyone({"losses": a.losses, "params": a.params})
    return {"losses_across_ranks": everyone[0]["losses"] == everyone[1]["losses"],
            "params_across_ranks": all(torch.equal(everyone[0]["params"][k], everyone[1]["params"][k])
                                       for k in a.params),
            "deterministic": a.losses == b.losses
                             and all(torch.equal(a.params[k], b.params[k]) for k in a.params),
            "dropout_changed_losses": a.losses != no_drop.losses}


def _full_logits(local: torch.Tensor, vocab: int) -> torch.Tensor:
    return gather_from_region(local.contiguous())[..., :vocab]


def _generation(config) -> dict:
    out = {}
    prompt = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    for name, cfg, kwargs in (("tp", config, {}), ("sp", config, {"sequence_parallel": True}),
                              ("pad", config.with_(vocab_size=63), {"pad_vocab": True})):
        ref = fresh_model(cfg)
        tp = parallelize(fresh_model(cfg), **kwargs)
        want = ref.generate(prompt, 11, greedy=True)
        out[f"greedy_{name}"] = torch.equal(tp.generate(prompt, 11, greedy=True), want)
        no_cache = tp.generate(prompt, 11, greedy=True, use_cache=False)
        out[f"greedy_nocache_{name}"] = torch.equal(no_cache, want)
        out[f"sp_restored_{name}"] = tp.sequence_parallel == kwargs.get("sequence_parallel", False)
    # logits: prefill the prompt, then 4 decode steps, against the single-process cache
    ref, tp = fresh_model(config).eval(), parallelize(fresh_model(config)).eval()
    B, total = prompt.size(0), prompt.size(1) + 4
    ref_cache, tp_cache = KVCache(config, B, total), tp.kv_cache(B, total)
    diff, step = 0.0, prompt
    with torch.no_grad():
        for _ in range(5):
            want, _ = ref(step, cache=ref_cache)
            local, _ = tp(step, cache=tp_cache)
            diff = max(diff, (_full_logits(local, config.vocab_size) - want).abs().max().item())
            step = want[:, -1:].argmax(-1)
    out["logit_diff"] = diff
    out["cache_bytes"] = tp_cache.nbytes()
    out["cache_formula"] = kv_cache_bytes(config, B, total, kv_heads=config.kv_heads // dist.get_world_size())
    out["cache_one_process"] = ref_cache.nbytes()
    # sampling: a different generator on each rank; rank 0's draw is broadcast
    tp = parallelize(fresh_model(config))
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    sampled = tp.generate(prompt, 11, temperature=1.0, top_k=20, generator=gen)
    everyone = _everyone(sampled)
    out["sampled_same_on_ranks"] = torch.equal(everyone[0], everyone[1])
    ref = fresh_model(config)

    def one_process(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return ref.generate(prompt, 11, temperature=1.0, top_k=20, generator=gen)

    out["sampled_equals_rank0_one_process"] = torch.equal(sampled, one_process(100))
    out["compare"] = compare_tp_generation(fresh_model(config), parallelize(fresh_model(config)), prompt, 9)
    out["seeds_differ"] = not torch.equal(sampled, one_process(101))  # rank 1 alone would disagree
    return out


def _everything() -> dict:
    data = load_tokens("handbook")
    out = {}
    for family in FAMILIES:
        out[family] = {"generation": _generation(CONFIGS[family])}
        for sp in (False, True):
            out[family][f"masks_sp{sp}"] = _masks(DROPS[family], sp)
            if family == "gpt2":  # the masks above check the Llama modules; training adds only time
                out[family][f"train_sp{sp}"] = _training(DROPS[family], sp, data)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_everything, 2, timeout_s=180)


@pytest.mark.parametrize("family", FAMILIES)
def test_replicated_dropout_masks_equal_per_rank_masks_differ_without_sp(results, family):
    for rank in results:
        r = rank[family]["masks_spFalse"]
        for name, equal in r["equal"].items():
            per_rank = name.endswith("attn_dropout")  # this rank's own heads
            assert equal != per_rank, (name, equal)
            assert 0.05 < r["rate"][name] < 0.15, (name, r["rate"][name])  # p = 0.1 really drew
        assert any(n.endswith("attn_dropout") for n in r["equal"])
        assert r["default_in_step"] and r["loss_spread"] == 0.0
        assert r["hidden_equal"]  # the replicated activations really are replicated


@pytest.mark.parametrize("family", FAMILIES)
def test_every_dropout_is_per_rank_with_sequence_parallel(results, family):
    for rank in results:
        r = rank[family]["masks_spTrue"]
        assert len(r["equal"]) == 1 + 3 * TINY.n_layer  # embedding + attn, resid, mlp per layer
        assert not any(r["equal"].values()), r["equal"]  # shards of the sequence, own heads
        assert r["default_in_step"] and r["loss_spread"] == 0.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sp", [False, True])
def test_desynced_default_stream_breaks_replicated_activations_and_unseeded_fork_names_the_fix(results, sp,
                                                                                               family):
    for rank in results:
        r = rank[family][f"masks_sp{sp}"]
        if not sp:  # without SP the replicated masks come from the default stream
            assert not r["desynced_hidden_equal"]
        assert "model_parallel_seed(seed, tp_rank)" in r["unseeded_error"]


@pytest.mark.parametrize("sp", [False, True])
def test_training_with_dropout_stays_in_sync_and_is_deterministic(results, sp):
    for rank in results:
        r = rank["gpt2"][f"train_sp{sp}"]
        assert r["dropout_changed_losses"]  # dropout was really on
        assert r["losses_across_ranks"]  # bitwise, every step
        assert r["params_across_ranks"]  # replicated params (LayerNorms, biases, wpe) in sync
        assert r["deterministic"]  # same seed, same losses and params


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["tp", "sp", "pad"])
def test_greedy_generation_equals_one_process(results, name, family):
    for rank in results:
        g = rank[family]["generation"]
        assert g[f"greedy_{name}"] and g[f"greedy_nocache_{name}"] and g[f"sp_restored_{name}"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_and_per_rank_cache_bytes(results, family):
    for rank in results:
        g = rank[family]["generation"]
        assert g["logit_diff"] < LOGIT_TOL, g["logit_diff"]
        assert g["cache_bytes"] == g["cache_formula"] == g["cache_one_process"] // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_draws_the_same_tokens_on_every_rank(results, family):
    for rank in results:
        g = rank[family]["generation"]
        assert g["seeds_differ"]  # the ranks' generators would disagree on their own
        assert g["sampled_same_on_ranks"] and g["sampled_equals_rank0_one_process"]


@pytest.mark.parametrize("family", FAMILIES)
def test_compare_tp_generation_helper_used_by_lab_03(results, family):
    for rank in results:
        c = rank[family]["generation"]["compare"]
        # the kv heads each rank caches: GPT-2's 4 heads / 2, the GQA config's 2 kv heads / 2
        assert c["greedy_identical"] and c["sampled_same_on_ranks"]
        assert c["heads_per_rank"] == {"gpt2": 2, "llama": 1}[family]
        assert c["max_logit_diff"] < LOGIT_TOL
        assert c["cache_bytes_per_rank"] == c["cache_bytes_formula"] == c["cache_bytes_one_process"] // 2


def _stream_checks(device: str) -> None:
    """fork("tp") leaves the default stream exactly where it was, continues its own stream across
    forks, and gives different tp ranks different streams."""
    model_parallel_seed(3, 0)
    plain = [torch.rand(5, device=device) for _ in range(2)]
    model_parallel_seed(3, 0)
    first = torch.rand(5, device=device)
    with fork("tp", device):
        tp_a = torch.rand(5, device=device)
    with fork("tp", device):
        tp_b = torch.rand(5, device=device)
    second = torch.rand(5, device=device)
    assert torch.equal(first, plain[0]) and torch.equal(second, plain[1])  # default: untouched
    assert not torch.equal(tp_a, tp_b)  # the tp stream advanced, not restarted
    assert not torch.equal(tp_a, first)
    model_parallel_seed(3, 1)
    with fork("tp", device):
        other_rank = torch.rand(5, device=device)
    assert not torch.equal(other_rank, tp_a)
    model_parallel_seed(3, 0)
    with fork("tp", device):
        assert torch.equal(torch.rand(5, device=device), tp_a)  # reseeding restarts the stream
    get_tracker().reset()
    with pytest.raises(RuntimeError, match="model_parallel_seed"):
        with fork("tp", device):
            pass


def test_fork_swaps_the_cpu_stream_in_and_out():
    with torch.random.fork_rng(devices=[]):  # leave pytest's own RNG state as it was
        _stream_checks("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fork_swaps_the_cuda_stream_in_and_out():
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        _stream_checks("cuda")
