"""Notes never drift: every checked number in notes/*.md is recomputed by the package.

A checked number is a number followed directly by an HTML comment holding an expression:

    GPT-2 small has 124,439,808 <!-- = param_count(P("gpt2-small")) --> parameters.
    its KV cache is 36.00 GiB <!-- = kv_cache_bytes(P("gpt2-small"), 32, 32768, "bf16") -->

Formatting rules (what the shown number must equal):
* commas are thousands separators; the shown decimals are the rounding: the expression's value,
  converted to the shown unit, rounded to as many decimals as are shown, must equal the number;
* byte units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024);
  FLOP units: FLOP, kFLOP/MFLOP/GFLOP/TFLOP/PFLOP (powers of 1000);
  count suffixes K/M (thousand, million, e.g. `85.0M`); time units ms, s, h (expression in seconds);
* `%`: the expression is a fraction, shown times 100 (`18.75% <!-- = bubble_formula("1f1b", 4, 13) -->`);
* `x` (or `×`) after a number: a plain ratio;
* scientific notation (`2.6e-5`): the mantissa's decimals are the rounding at that exponent.
Every `<!-- =` comment must sit right after a number, so a broken check fails instead of vanishing.
A note may name a value for its later checks, on a line of its own: `<!-- let N7B = param_count(...) -->`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch

import journey_dist.cluster as cluster
import journey_dist.compression as compression
import journey_dist.config as config
import journey_dist.desync as desync
import journey_dist.flops as flops
import journey_dist.memory.estimate as estimate
import journey_dist.memory.sizes as sizes
import journey_dist.moe as moe
import journey_dist.numerics as numerics
import journey_dist.runtime as runtime
import journey_dist.scaling as scaling
import journey_dist.search as search
import journey_dist.steptime as steptime
from journey_dist.comm import analytic, ring_factor
from journey_dist.data import get_batch, load_text, load_tokens
from journey_dist.kv_cache import kv_memory_table, paged_vs_preallocated, sample_lengths
from journey_dist.lora import apply_scratch_lora, param_counts
from journey_dist.memory.sizes import layer_matrix_params
from journey_dist.model import GPT
from journey_dist.ngram import NGramLM, per_byte_perplexity
from journey_dist.parallel.compose import expected_comm_per_step
from journey_dist.parallel.context.accounting import kv_block_bytes, layer_comm, step_comm
from journey_dist.parallel.context.layout import SequenceLayout, attention_work, imbalance
from journey_dist.parallel.data.replicas import bucket_layout, planned_buckets
from journey_dist.parallel.expert.accounting import even_load_forwards, expected_collectives, planned_comm
from journey_dist.parallel.pipeline.timeline import bubble_formula
from journey_dist.parallel.sharding.deepspeed import deepspeed_config
from journey_dist.parallel.sharding.fsdp import unit_bytes
from journey_dist.parallel.sharding.zero import padded_numel, shard_range, unsharded_adamw_state_bytes
from journey_dist.parallel.tensor.parallelize import analytic_collectives, padded_vocab_size
from journey_dist.parity import fresh_model
from journey_dist.serving.quant import quantized_weight_bytes
from journey_dist.tokenizer import (
    BPETokenizer,
    WordPieceTokenizer,
    bert_pre_tokenize,
    split_chunks,
    train_merges,
)
from journey_dist.train import TrainConfig
from journey_dist.vocab_growth import HeapsFit, bpe_compression, fit_heaps, types_vs_tokens, word_tokens

ROOT = Path(__file__).resolve().parents[1]
NOTES = sorted((ROOT / "notes").glob("*.md"))

UNITS = {
    "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
    "FLOP": 1, "kFLOP": 1e3, "MFLOP": 1e6, "GFLOP": 1e9, "TFLOP": 1e12, "PFLOP": 1e15,
    "K": 1e3, "M": 1e6, "%": 0.01, "x": 1, "×": 1, "ms": 1e-3, "s": 1, "h": 3600, "": 1,
}
_UNIT_RE = "|".join(sorted((re.escape(u) for u in UNITS if u), key=len, reverse=True))
CHECK = re.compile(
    r"(?<![\w.])(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:e-?\d+)?)\s?(" + _UNIT_RE + r")?"
    r"(?:\*\*)?\s*<!--\s*=\s*(.+?)\s*-->", re.S)  # a number may be **bold**
LET = re.compile(r"<!--\s*let\s+([A-Za-z_]\w*)\s*=\s*(.+?)\s*-->", re.S)
ANY_CHECK = re.compile(r"(?<!`)<!--\s*=")  # a check quoted in `code` is an example, not a check
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@functools.cache
def lora_counts(cfg: config.GPTConfig, spec: config.LoRAConfig) -> tuple[int, int]:
    """(trainable, total) parameters of a real model wrapped by the from-scratch LoRA (lab 08's
    count, without PEFT's import time); small configs only: it allocates the weights."""
    torch.manual_seed(0)
    return param_counts(apply_scratch_lora(GPT(cfg), spec))


@functools.cache
def text(source: str) -> str:
    """An embedded corpus (data.load_text), read once per session."""
    return load_text(source)


@functools.cache
def bpe(source: str, num_merges: int) -> BPETokenizer:
    """A BPE tokenizer trained on an embedded corpus, once per session (well under a second)."""
    return BPETokenizer.train(text(source), num_merges, special_tokens=["<|endoftext|>"])


@functools.cache
def wordpiece(source: str, vocab_size: int) -> WordPieceTokenizer:
    """A WordPiece vocabulary learned on an embedded corpus, once per session (about a second)."""
    return WordPieceTokenizer.train(text(source), vocab_size)


@functools.cache
def heaps(source: str) -> HeapsFit:
    """Heaps' law fitted to an embedded corpus's word types vs words (lab 00's fit)."""
    return fit_heaps(*types_vs_tokens(word_tokens(text(source))))


@functools.cache
def bench(name: str) -> dict:
    """A committed benchmark result (benchmarks/results/<name>.json): notes quote measurements
    from there, so rerunning a benchmark flags every sentence that now misquotes it."""
    return json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())


@functools.cache
def first_grads(preset: str, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """fp32 gradients of a fresh seeded model's loss on one handbook training batch (small
    presets only: it allocates and runs the model)."""
    cfg = config.get_preset(preset)
    model = fresh_model(cfg, seed)
    x, y = get_batch(load_tokens("handbook").train, batch, cfg.block_size, 0, seed)
    model(x, y)[1].backward()
    return [p.grad for p in model.parameters()]


@functools.cache
def meta_gpt(cfg: config.GPTConfig) -> GPT:
    """The real model with no storage (parameter shapes only), for checks on gpt2-sized models."""
    with torch.device("meta"):
        return GPT(cfg)


def namespace() -> dict:
    """What a check may call: config and memory-estimate functions, comm and pipeline formulas,
DP bucket planning, the model on the meta device (P = get_preset), and the labs' pure functions:
the BPE tokenizer (`bpe(corpus, merges)`: trained once per session), WordPiece (`wordpiece(corpus,
size)`) and Heaps' law (`heaps(corpus)`), the n-gram model (tiny texts only: a note's `let` runs
once per test session), serving's quantized weight bytes, LoRA parameter counts on a real gpt-mini,
the KV-cache paging estimate, tensor-parallel, 3D and context-parallel expected collectives and
the cp layouts' attention work, ZeRO/FSDP byte
accounting and DeepSpeed's config builder, number formats (numerics.py), scaling laws
(scaling.py), communication-reduction bytes (compression.py), a small model's first gradients,
a mixture of experts' routing rules (journey_dist.moe), parameter counts and expert-parallel bytes
(planned_comm), and journey plan's time model (cluster presets, FLOPs, alpha-beta collectives,
predicted steps). None of them needs a process group."""
    ns = {name: getattr(math, name) for name in dir(math) if not name.startswith("_")}
    ns.update({k: v for k, v in vars(config).items() if not k.startswith("_")})
    ns.update({k: v for k, v in vars(estimate).items() if not k.startswith("_")})
    ns.update(math=math, ring_factor=ring_factor, analytic=analytic, bubble_formula=bubble_formula,
              P=config.get_preset, planned_buckets=planned_buckets, bucket_layout=bucket_layout,
              meta_gpt=meta_gpt, TrainConfig=TrainConfig)
    ns.update(BPETokenizer=BPETokenizer, split_chunks=split_chunks, train_merges=train_merges,
              NGramLM=NGramLM, per_byte_perplexity=per_byte_perplexity, text=text, bpe=bpe)
    ns.update(lora_counts=lora_counts, bench=bench, load_tokens=load_tokens, dist=torch.distributed)
    ns.update({k: getattr(numerics, k) for k in (
        "FORMATS", "format_info", "cast", "underflow_fraction", "overflow_fraction", "max_safe_scale",
        "grad_scaler_defaults", "fp8_scale", "delayed_scale", "sequential_sum", "gaussian",
        "relative_error")})
    ns.update(first_grads=first_grads, torch=torch, fresh_model=fresh_model, get_batch=get_batch)
    ns.update({k: getattr(scaling, k) for k in (
        "training_flops", "HOFFMANN", "BESIROGLU", "chinchilla_optimal", "kaplan_optimal_params",
        "kaplan_critical_batch", "steps_over_min", "examples_over_min", "grad_sq_norms",
        "noise_scale_from_norms", "scaled_lr")})
    ns.update({k: getattr(compression, k) for k in (
        "quantized_bytes", "zero3_step_bytes", "powersgd_elements", "powersgd_defaults",
        "one_bit_adam_volume")})
    ns.update(wordpiece=wordpiece, heaps=heaps, bert_pre_tokenize=bert_pre_tokenize, word_tokens=word_tokens,
              types_vs_tokens=types_vs_tokens, bpe_compression=bpe_compression,
              quantized_weight_bytes=quantized_weight_bytes)
    ns.update(paged_vs_preallocated=paged_vs_preallocated, sample_lengths=sample_lengths,
              kv_memory_table=kv_memory_table)
    ns.update(analytic_collectives=analytic_collectives, padded_vocab_size=padded_vocab_size,
              expected_comm_per_step=expected_comm_per_step)
    ns.update(SequenceLayout=SequenceLayout, attention_work=attention_work, work_imbalance=imbalance,
              kv_block_bytes=kv_block_bytes, layer_comm=layer_comm, step_comm=step_comm)
    ns.update(padded_numel=padded_numel, shard_range=shard_range,
              unsharded_adamw_state_bytes=unsharded_adamw_state_bytes, unit_bytes=unit_bytes,
              deepspeed_config=deepspeed_config)
    # mixture of experts: the routing rules, total/active/per-rank parameters, expert-parallel bytes
    ns.update({k: getattr(moe, k) for k in ("route", "capacity", "keep_mask", "expert_counts", "balance_loss",
                                            "z_loss", "imbalance")})
    ns.update({k: getattr(sizes, k) for k in ("active_param_count", "expert_param_count", "expert_params")})
    ns.update(planned_comm=planned_comm, expected_collectives=expected_collectives,
              even_load_forwards=even_load_forwards)
    # journey plan's time model
    ns.update(get_cluster=cluster.get_cluster, predict_step=steptime.predict_step,
              collective_time=steptime.collective_time, group_span=steptime.group_span,
              optimizer_seconds=steptime.optimizer_seconds, model_flops_per_token=flops.model_flops_per_token,
              stage_flops=flops.stage_flops, attention_share=flops.attention_share,
              layer_matrix_params=layer_matrix_params, search_layouts=search.search_layouts,
              layer_forward_flops=flops.layer_forward_flops, cp_attention_share=flops.cp_attention_share)
    # desyncs (notes/debugging.md): pairing by order, stragglers, the repo's and torch's timeouts
    ns.update({k: getattr(desync, k) for k in ("pair_by_order", "step_calls", "straggler_probability")})
    ns.update(runtime=runtime)
    return ns


@functools.cache
def note_namespace(note: str) -> dict:
    """namespace() plus the note's own `<!-- let name = expression -->` definitions, in order."""
    ns = namespace()
    for m in LET.finditer((ROOT / "notes" / note).read_text()):
        ns[m.group(1)] = eval(m.group(2), ns)  # noqa: S307 - written in this repository's notes
    return ns


def checks() -> list[tuple[str, int, str, str, str]]:
    found = []
    for path in NOTES:
        text = path.read_text()
        for m in CHECK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append((path.name, line, m.group(1), m.group(2) or "", m.group(3)))
    return found


CHECKS = checks()


def test_notes_exist_and_carry_many_checks():
    names = {p.name for p in NOTES}
    for name in ("README.md", "tokens.md", "bpe.md", "ngrams.md", "attention.md", "transformer_block.md",
                 "parameters.md", "parallelism.md", "zero.md", "memory.md", "kv_cache.md", "lora.md",
                 "serving.md", "reliability.md", "mixed_precision.md", "batch_size.md", "communication.md",
                 "context_parallel.md"):
        assert name in names, f"notes/{name} is missing"
    # 386 when this floor was set: a floor of 250 let a third of the checks vanish unnoticed
    assert len(CHECKS) >= 380, f"only {len(CHECKS)} checked numbers in notes/ (386 when this was written)"


def test_every_check_comment_follows_a_number():
    for path in NOTES:
        text = path.read_text()
        starts = {m.start(3) for m in CHECK.finditer(text)}
        for m in ANY_CHECK.finditer(text):
            close = text.find("-->", m.end())
            inside = [s for s in starts if m.end() <= s < close]
            line = text.count("\n", 0, m.start()) + 1
            assert inside, f"{path.name}:{line}: `<!-- =` comment does not follow a number"


def test_no_line_starts_with_a_comment():
    # CommonMark: a line starting with `<!--` opens an HTML block, which breaks the paragraph and
    # shows the text after `-->` raw; keep each check on its number's line
    for path in NOTES:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if LET.fullmatch(line.strip()):
                continue  # a definition on its own line is a hidden HTML block: fine
            assert not line.lstrip().startswith("<!--"), f"{path.name}:{i}: join it to the line above"


def shown_matches(shown: str, unit: str, value: float) -> tuple[bool, float]:
    """Is `shown` (in `unit`) the value rounded to the shown decimals? Returns (ok, expected)."""
    mantissa, _, exponent = shown.partition("e")
    scale = 10.0 ** int(exponent or 0)
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    expected = round(float(value) / UNITS[unit] / scale, decimals)
    ok = math.isclose(float(mantissa.replace(",", "")), expected, rel_tol=0, abs_tol=10 ** -decimals / 1e3)
    return ok, expected * scale


@pytest.mark.parametrize("note,line,shown,unit,expr", CHECKS, ids=[f"{c[0]}:{c[1]}" for c in CHECKS])
def test_checked_number(note, line, shown, unit, expr):
    value = eval(expr, note_namespace(note))  # noqa: S307 - expressions written in this repository's notes
    ok, expected = shown_matches(shown, unit, value)
    assert ok, f"notes/{note}:{line}: shows {shown}{unit} but `{expr}` gives {value!r} ({expected}{unit})"


def test_shown_matches_rules():
    assert shown_matches("124,439,808", "", 124_439_808)[0]
    assert shown_matches("4.6", "GiB", 4.6 * 2**30 + 1e6)[0]
    assert not shown_matches("4.7", "GiB", 4.6 * 2**30)[0]
    assert shown_matches("18.75", "%", 0.1875)[0]
    assert not shown_matches("18.8", "%", 0.1875 - 0.001)[0]
    assert shown_matches("1.5", "GB", 1.5e9)[0]
    m = CHECK.search("bubble 18.75% <!-- = bubble_formula('1f1b', 4, 13) --> here")
    assert m.group(1, 2) == ("18.75", "%")
    assert CHECK.search("x 124,439,808 <!-- = 1 -->").group(1) == "124,439,808"
    assert CHECK.search("diff 2.6e-5 <!-- = 2.6e-5 --> x").group(1) == "2.6e-5"
    assert shown_matches("2.6e-5", "", 2.64e-5)[0] and not shown_matches("2.6e-5", "", 2.66e-5)[0]
    assert shown_matches("4.8e-7", "", 4.8e-7)[0]


def _links(path: Path) -> list[tuple[int, str]]:
    text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), path.read_text(), flags=re.S)
    out = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web links and in-page anchors
        out.append((text.count("\n", 0, m.start()) + 1, target.split("#")[0]))
    return out


@pytest.mark.parametrize("path", NOTES, ids=[p.name for p in NOTES])
def test_relative_links_resolve(path):
    for line, target in _links(path):
        resolved = (path.parent / target).resolve()
        rel = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else target
        assert resolved.exists(), f"notes/{path.name}:{line}: link {target} -> {rel} does not exist"

