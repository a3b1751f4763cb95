"""Serving GPT-mini: continuous batching over a paged KV cache, weight-only quantization, TP inference.

    blocks.py     PagedKVCache (the block pool) and BlockManager (block tables, allocate, free)
    paged.py      the model's forward over the pool: a flat batch of prefill chunks and decode tokens
    trace.py      Request, request validation, seeded traces (Poisson arrivals, long-tailed lengths)
    scheduler.py  ServingEngine: static vs continuous batching, preemption by recompute, metrics
    quant.py      int8 per-channel / int4 per-group weight-only quantization, torchao as reference
    tp.py         one rank of tensor-parallel generation with its weights and cache measured

Lab: labs/13_serving.py; notes: notes/serving.md.
"""
