"""Tensor-parallel inference: the TP generate path (parallel/tensor/generate.py) on t ranks, with what
each rank holds measured: its weight shards and its KV cache (its H/t heads).

    launch(tp_inference_rank, 2, model.state_dict(), model.config.to_dict(), prompt, 32)

Each rank keeps 1/t of every split matrix (attention heads, MLP columns/rows, vocabulary rows of
the tied embedding) plus the replicated LayerNorms, biases of row-parallel layers and position
embeddings: memory.estimate.param_count(cfg, tp=t) parameters. Its cache holds only its own
heads: kv_cache_bytes(cfg, B, tokens, kv_heads=H/t), 1/t of one process's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from journey_dist.config import GPTConfig
from journey_dist.memory.estimate import fmt_bytes, param_count
from journey_dist.model import GPT
from journey_dist.parallel.tensor.generate import compare_tp_generation
from journey_dist.parallel.tensor.parallelize import parallelize
from journey_dist.report import sci, table
from journey_dist.serving.quant import model_bytes


def tp_inference_rank(state: dict[str, torch.Tensor], config: dict, prompt: torch.Tensor,
                      new_tokens: int) -> dict:
    """One rank of tensor-parallel generation over the whole world (collective: call on every rank).

    Builds the GPT from `state`, splits it (parallel/tensor/parallelize.parallelize), and runs
    compare_tp_generation: greedy tokens vs one process, max |logit diff|, this rank's cache bytes
    vs formula. Adds this rank's weight bytes vs param_count(cfg, tp) x element size.
    """
    cfg = GPTConfig(**config)
    model = GPT(cfg)
    model.load_state_dict(state)
    model.eval()
    tp_model = parallelize(model)
    t = dist.get_world_size()
    gen = compare_tp_generation(model, tp_model, prompt, new_tokens)
    element = next(model.parameters()).element_size()
    return {"rank": dist.get_rank(), "tp": t, "batch": prompt.size(0), "tokens": prompt.size(1) + new_tokens,
            "weight_bytes": model_bytes(tp_model), "weight_bytes_formula": param_count(cfg, tp=t) * element,
            "weight_bytes_one_process": model_bytes(model), **gen}


def tp_table(rows: list[dict]) -> str:
    """tp_inference_rank's rows: per rank its heads, weight and KV cache bytes next to their formula
    and to one process's, and whether its greedy tokens equal one process's."""
    flat = [{**r, "same": "yes" if r["greedy_identical"] else "NO"} for r in rows]
    return table(flat, [("rank", "rank", str), ("heads_per_rank", "heads", str),
                        ("weight_bytes", "weights", fmt_bytes),
                        ("weight_bytes_formula", "formula", fmt_bytes),
                        ("weight_bytes_one_process", "one process", fmt_bytes),
                        ("cache_bytes_per_rank", "KV cache", fmt_bytes),
                        ("cache_bytes_formula", "formula", fmt_bytes),
                        ("cache_bytes_one_process", "one process", fmt_bytes), ("same", "same tokens", str),
                        ("max_logit_diff", "max|logit|", sci)])
