"""What context parallelism costs, from the formula (pure: no process group). The CommLedger of a
run equals these numbers (tests/test_context_parallel.py); `journey plan --cp` prints them.

Per layer and micro-step, with a = b·(S/cp)·d bytes of one head's tokens on a rank (d the head
size, fp32: 4 bytes a value), H query and K kv heads on the rank (after tp):

    ring, zigzag  a k/v block is 2·K·a: forward sends cp-1 blocks; backward sends them again
                  (cp-1) and the partial dK/dV of each block once per hop (cp): 3cp-2 sends, as
                  many receives of the same sizes
    ulysses       4 all-to-alls forward (q: H·a, k and v: K'·a each, output: H·a) and the same 4
                  backward; K' = K, or cp when K < cp (each kv head repeated cp/K times)

and once per micro-step the loss: one all-reduce of [loss sum, token count] (8 bytes) over cp;
once per step every gradient all-reduced over cp (x dp) (not here: it is the model's size).
"""

from __future__ import annotations

from journey_dist.config import ConfigError, GPTConfig, ParallelConfig
from journey_dist.parallel.context.layout import SequenceLayout
from journey_dist.parallel.context.ulysses import check_ulysses

CP_SCHEDULES = ("gpipe", "1f1b")  # pipeline schedules the cp stages are built and tested with


def check_context_parallel(pcfg: ParallelConfig, config: GPTConfig, seq_len: int) -> None:
    """ConfigError (before any rank starts) for a cp split that cannot run: the sequence must cut
    into cp (zigzag: 2cp) equal chunks; Ulysses must split the (tp-local) heads; the pipeline
    schedule must be one the cp stages run with; the model's features must be ones cp splits."""
    if pcfg.cp == 1:
        return
    if pcfg.pp > 1 and pcfg.schedule not in CP_SCHEDULES:
        raise ConfigError(
            f"cp={pcfg.cp} with pp={pcfg.pp}: the context-parallel stages are built and tested with the "
            f"{' and '.join(CP_SCHEDULES)} schedules, not {pcfg.schedule!r}; use schedule='1f1b' "
            "(or gpipe), or cp=1")
    if pcfg.sequence_parallel:
        raise ConfigError("sequence_parallel with cp > 1 is not supported (both split the sequence: "
                          "cp across attention, sp across tp's norms); use one of them")
    SequenceLayout(pcfg.cp, "zigzag" if pcfg.cp_design == "zigzag" else "plain").check(seq_len)
    if pcfg.cp_design == "ulysses":
        check_ulysses(config.n_head // pcfg.tp, config.kv_heads // pcfg.tp, pcfg.cp)
    check_cp_model(config)


def check_cp_model(config: GPTConfig) -> None:
    """ConfigError for model features the context-parallel wrapper does not split."""
    if config.positions == "alibi":
        raise ConfigError("positions='alibi' is not supported under context parallel (its distance bias "
                          "is not passed round the ring here); use learned, sinusoidal or rope")
    if config.dropout > 0:
        raise ConfigError(f"dropout={config.dropout}: context parallel here has no attention dropout "
                          "inside the ring (and cp ranks would draw different masks); use dropout=0")


def local_heads(config: GPTConfig, tp: int = 1) -> tuple[int, int]:
    """(query heads, kv heads) one rank's attention holds under tp (GPT-2: kv = query heads)."""
    return config.n_head // tp, config.kv_heads // tp


def layer_comm(config: GPTConfig, design: str, cp: int, *, micro_batch: int, seq_len: int, tp: int = 1,
               bytes_per_value: int = 4) -> dict[str, dict[str, int]]:
    """One layer's cp traffic for one micro-step, forward and backward: {op: {calls, bytes}}."""
    if cp == 1:
        return {}
    H, K = local_heads(config, tp)
    a = micro_batch * (seq_len // cp) * config.head_dim * bytes_per_value
    if design == "ulysses":
        k_sent = K if K % cp == 0 else cp
        per_pass = 2 * H * a + 2 * k_sent * a  # q, output; k, v
        return {"all_to_all": {"calls": 8, "bytes": 2 * per_pass}}
    kv, hops = 2 * K * a, 3 * cp - 2
    return {"send": {"calls": hops, "bytes": hops * kv}, "recv": {"calls": hops, "bytes": hops * kv}}


def step_comm(config: GPTConfig, design: str, cp: int, *, micro_batch: int, seq_len: int, micro_steps: int,
              layers: int, loss: bool = True, tp: int = 1,
              bytes_per_value: int = 4) -> dict[str, dict[str, int]]:
    """The cp group's traffic of one training step for `layers` layers: {op: {calls, bytes}};
    `loss`: this rank computes the loss (one 8-byte all-reduce per micro-step)."""
    out: dict[str, dict[str, int]] = {}
    for op, row in layer_comm(config, design, cp, micro_batch=micro_batch, seq_len=seq_len, tp=tp,
                              bytes_per_value=bytes_per_value).items():
        out[op] = {k: v * layers * micro_steps for k, v in row.items()}
    if loss and cp > 1:
        out["all_reduce"] = {"calls": micro_steps, "bytes": 8 * micro_steps}
    return out


def grad_sync(param_bytes: list[int]) -> dict[str, int]:
    """Every gradient all-reduced once over cp (x dp) after backward: one call per tensor."""
    return {"calls": len(param_bytes), "bytes": sum(param_bytes)}


def kv_block_bytes(config: GPTConfig, cp: int, *, micro_batch: int, seq_len: int, tp: int = 1,
                   bytes_per_value: int = 4) -> int:
    """The k/v block a ring rank sends per hop: 2 x kv heads x b x S/cp x head size."""
    K = local_heads(config, tp)[1]
    return 2 * K * micro_batch * (seq_len // cp) * config.head_dim * bytes_per_value


def cp_plan_notes(config: GPTConfig, pcfg: ParallelConfig, *, batch: int, seq: int,
                  bytes_per_value: int = 4) -> list[str]:
    """What `journey plan` says about a cp split: tokens per rank, what the cp group carries per
    layer and micro-step, where gradients are reduced ([] when cp = 1)."""
    if pcfg.cp == 1:
        return []
    b = batch // (pcfg.dp * pcfg.microbatches)
    per_layer = layer_comm(config, pcfg.cp_design, pcfg.cp, micro_batch=b, seq_len=seq, tp=pcfg.tp,
                           bytes_per_value=bytes_per_value)
    if pcfg.cp_design == "ulysses":
        what = (f"4 all-to-alls forward and 4 backward per layer, {per_layer['all_to_all']['bytes']:,} bytes "
                "handed over per layer and micro-step")
    else:
        kv = kv_block_bytes(config, pcfg.cp, micro_batch=b, seq_len=seq, tp=pcfg.tp,
                            bytes_per_value=bytes_per_value)
        what = (f"k/v blocks of {kv:,} bytes round the ring, {pcfg.cp - 1} sends forward and "
                f"{3 * pcfg.cp - 2} in all per layer and micro-step (backward: the blocks again and "
                "their dK/dV)" + (", zigzag: every rank the same causal work" if pcfg.cp_design == "zigzag"
                                  else ""))
    group = "the dp x cp group" if pcfg.dp > 1 else "the cp group"
    return [f"context parallel ({pcfg.cp_design}): each rank holds {seq // pcfg.cp} of {seq} tokens; the "
            f"cp group passes {what}; gradients are summed over {group} (size {pcfg.dp * pcfg.cp})"]
