"""Measure the memory of one training step: exact tensor accounting on CPU, the allocator on CUDA.

    m = measure_step(model, optimizer, x, y)      # warm-up step, then one measured step
    m.peak, m.high_water["activations"], m.at_peak, m.cuda, m.rss

Three instruments, each labelled with what it is:

* `TensorLedger` (any device): a TorchDispatchMode that sees every tensor an op creates and
  follows its storage until it is freed, so "bytes alive" is exact. Each storage carries a
  category, upgraded as we learn what it is:
    params       model parameters and buffers
    grads        a `.grad` (marked when autograd accumulates it)
    optimizer    a tensor in `optimizer.state` (marked around `optimizer.step()`)
    logits       made between the output head's forward and the end of the model's forward:
                 logits, their fp32 copy, log-softmax, loss
    activations  saved for backward (seen by a saved-tensors pack hook)
    temporaries  everything else (gradients flowing backward, optimizer scratch, ...)
  It reports the peak of the total, the breakdown at that instant, each category's own
  high-water mark, and a labelled timeline (after forward / backward / step).
* CUDA caching allocator (`torch.cuda.max_memory_allocated` / `max_memory_reserved`), reset
  after warm-up so cuBLAS workspaces and optimizer states already exist. The workspaces are
  measured separately (`allocated_outside_tensors`: allocated bytes that belong to no tensor
  after warm-up) and reported, since the analytic estimate does not model them.
* Process RSS (psutil): what the OS sees, including the Python interpreter, libraries and the
  CPU allocator's caching. It is context, not a measurement of tensors.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from journey_dist.config import ConfigError
from journey_dist.model import GPT
from journey_dist.recompute import recompute_mode, set_recompute
from journey_dist.train import TrainConfig, autocast_context, make_optimizer

CATEGORIES = ("params", "grads", "optimizer", "activations", "logits", "temporaries")
# A storage only moves to a higher-priority category: a saved log-softmax stays "logits".
_RANK = {c: i for i, c in enumerate(("params", "grads", "optimizer", "logits", "activations", "temporaries"))}


class _Entry:
    __slots__ = ("nbytes", "category")

    def __init__(self, nbytes: int, category: str):
        self.nbytes, self.category = nbytes, category


class TensorLedger(TorchDispatchMode):
    """Exact bytes of live tensor storages, by category (see the module docstring).

    with TensorLedger(model, optimizer) as ledger:
        loss = model(x, y)[1]; loss.backward(); optimizer.step()
    ledger.peak, ledger.at_peak, ledger.high_water

    Storages are counted once however many views share them. `head` (default: `model.lm_head`
    when present) starts the "logits" region; the model's forward end closes it.
    """

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 head: nn.Module | None = None):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.head = head if head is not None else getattr(model, "lm_head", None)
        self._entries = WeakIdKeyDictionary()  # UntypedStorage -> _Entry
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.at_peak = dict(self.current)
        self.high_water = dict(self.current)
        self.timeline: list[tuple[str, int]] = []
        self._in_logits = False
        self._handles: list[Any] = []
        self._saved_hooks: contextlib.AbstractContextManager | None = None
        self._finalizers: list[weakref.finalize] = []

    # ------------------------------------------------------------------ bookkeeping
    def track(self, t: torch.Tensor, category: str) -> None:
        """Count `t`'s storage (once) and move it to `category` if that ranks higher."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        entry = self._entries.get(st)
        if entry is None:
            entry = _Entry(st.nbytes(), category)
            self._entries[st] = entry
            self._finalizers.append(weakref.finalize(st, self._free, entry))
            self._add(entry.category, entry.nbytes)
        elif _RANK[category] < _RANK[entry.category]:
            self._add(entry.category, -entry.nbytes)
            entry.category = category
            self._add(category, entry.nbytes)
        elif st.nbytes() != entry.nbytes:  # resized in place (rare: out= ops)
            self._add(entry.category, st.nbytes() - entry.nbytes)
            entry.nbytes = st.nbytes()
        self._update_peak()

    def _free(self, entry: _Entry) -> None:
        self._add(entry.category, -entry.nbytes)

    def _add(self, category: str, nbytes: int) -> None:
        self.current[category] += nbytes
        self.total += nbytes
        if self.current[category] > self.high_water[category]:
            self.high_water[category] = self.current[category]

    def _update_peak(self) -> None:
        if self.total > self.peak:
            self.peak = self.total
            self.at_peak = dict(self.current)

    def mark(self, label: str) -> None:
        """Record the bytes alive now under `label` (e.g. 'after forward')."""
        self.timeline.append((label, self.total))

    def track_state(self) -> None:
        """(Re)classify parameters, their grads and the optimizer state as they are now."""
        if self.model is not None:
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                self.track(t, "params")
                if t.grad is not None:
                    self.track(t.grad, "grads")
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        self.track(v, "optimizer")

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = "logits" if self._in_logits else "temporaries"
        for t in tree_leaves(out):
            # New storages only: a view or in-place result keeps the category it has.
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                if t.untyped_storage() not in self._entries:
                    self.track(t, category)
        return out

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.track(t, "activations")
        return t

    # ------------------------------------------------------------------ context
    def __enter__(self) -> TensorLedger:
        self.track_state()
        if self.model is not None:
            for p in self.model.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(
                        lambda p: self.track(p.grad, "grads")))
            if self.head is not None:
                self._handles.append(self.head.register_forward_pre_hook(self._open_logits))
                self._handles.append(self.model.register_forward_hook(self._close_logits))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(lambda *a: self.track_state()))
            self._handles.append(self.optimizer.register_step_post_hook(lambda *a: self.track_state()))
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved_hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._saved_hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for f in self._finalizers:  # stop counting: the ledger's window is closed
            f.detach()
        self._finalizers.clear()

    def _open_logits(self, *_):
        self._in_logits = True

    def _close_logits(self, *_):
        self._in_logits = False

    def summary(self) -> dict:
        return {"peak": self.peak, "at_peak": dict(self.at_peak), "high_water": dict(self.high_water),
                "timeline": list(self.timeline)}


# ---------------------------------------------------------------------- process / allocator


def rss_bytes() -> dict[str, int]:
    """Process resident set size now and its high-water mark (OS view: interpreter, libs, caches)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return {"rss": psutil.Process().memory_info().rss, "rss_high_water": peak}


def _allocator_bytes(tensors) -> int:
    """Bytes the CUDA caching allocator charges for these tensors' storages (512-byte blocks)."""
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += max(512, -(-st.nbytes() // 512) * 512)
    return total


def allocated_outside_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                              *extra: torch.Tensor) -> int:
    """CUDA bytes allocated that belong to no tensor we hold: after a warm-up step this is mostly
    cuBLAS/cuBLASLt workspaces (PyTorch allocates them through the caching allocator, one per
    handle and stream). memory_allocated() minus params, grads, optimizer state and inputs."""
    tensors = list(model.parameters()) + list(model.buffers()) + list(extra)
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    device = tensors[0].device
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) - _allocator_bytes(tensors)


@dataclass
class Measurement:
    """One measured training step. Bytes; see the module docstring for each instrument."""

    device: str
    peak: int  # ledger peak of all live tensor bytes (CPU) or max_memory_allocated (CUDA)
    high_water: dict[str, int] = field(default_factory=dict)  # each ledger category's own maximum
    at_peak: dict[str, int] = field(default_factory=dict)  # ledger categories at the peak instant
    timeline: list = field(default_factory=list)
    ledger_peak: int = 0
    cuda: dict[str, int] = field(default_factory=dict)  # allocator: max allocated/reserved, workspaces
    rss: dict[str, int] = field(default_factory=dict)  # process RSS (OS view), for context only
    instrument: str = "tensor ledger"

    def to_dict(self) -> dict:
        return asdict(self)


def _default_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y)[1]


@contextlib.contextmanager
def checkpointed(model: nn.Module, mode: str = "full"):
    """Activation recompute of every block as recompute.set_recompute does it (full: each block
    keeps only its input and re-runs its forward in backward; selective: the attention core
    only); back to none on exit."""
    set_recompute(model, mode)
    try:
        yield model
    finally:
        set_recompute(model, "none")


def _step(model, optimizer, x, y, autocast, loss_fn, ledger: TensorLedger | None = None,
          microbatches: int = 1) -> None:
    for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
        with autocast_context(x.device, autocast):
            loss = loss_fn(model, xm, ym) / microbatches
        if ledger is not None:
            ledger.mark("after forward")
        loss.backward()
        del loss
        if ledger is not None:
            ledger.mark("after backward")
    if optimizer is not None:
        optimizer.step()
        if ledger is not None:
            ledger.mark("after optimizer step")
        optimizer.zero_grad(set_to_none=True)


def measure_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, x: torch.Tensor,
                 y: torch.Tensor, *, autocast: str | None = None, warmup: int = 1,
                 loss_fn=_default_loss, ledger: bool | None = None, microbatches: int = 1,
                 recompute: str | bool = "none") -> Measurement:
    """Run `warmup` training steps, then measure one (forward, backward, step, zero_grad).

    Warm-up matters: AdamW creates its state at the first step, and on CUDA cuBLAS
    workspaces and the autocast weight cache appear at the first matmul. On CPU the
    tensor ledger is the measurement; on CUDA the allocator is (`ledger=True` adds the
    ledger there too, slower). `microbatches` accumulates gradients over chunks of the
    batch; `recompute` (recompute.RECOMPUTE_MODES; True: "full") checkpoints every block or its
    attention core (see `checkpointed`).
    """
    mode = recompute_mode(recompute)
    with checkpointed(model, mode) if mode != "none" else contextlib.nullcontext():
        return _measure(model, optimizer, x, y, autocast, warmup, loss_fn, ledger, microbatches)


def _measure(model, optimizer, x, y, autocast, warmup, loss_fn, ledger, microbatches) -> Measurement:
    device = x.device
    step = lambda led=None: _step(model, optimizer, x, y, autocast, loss_fn, led, microbatches)  # noqa: E731
    for _ in range(warmup):
        step()
    use_ledger = device.type != "cuda" if ledger is None else ledger
    result = Measurement(device=str(device), peak=0)
    if device.type == "cuda":
        result.cuda["workspace"] = allocated_outside_tensors(model, optimizer, x, y)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    if use_ledger:
        with TensorLedger(model, optimizer) as led:
            led.track(x, "activations")  # token ids: kept by the embedding
            led.track(y, "logits")  # targets: kept by the loss
            step(led)
        result.ledger_peak = led.peak
        result.high_water, result.at_peak, result.timeline = led.high_water, led.at_peak, led.timeline
        result.peak = led.peak
    else:
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.cuda.update(
            allocated_before_step=base,
            max_allocated=torch.cuda.max_memory_allocated(device),
            max_reserved=torch.cuda.max_memory_reserved(device),
        )
        result.peak = result.cuda["max_allocated"]
        result.instrument = "CUDA caching allocator (max_memory_allocated)"
    result.rss = rss_bytes()
    return result


# ---------------------------------------------------------------------- one config, end to end

MEASURABLE = ("fp32", "bf16", "fp16", "bf16-autocast", "fp16-autocast")


def measure_config(cfg, *, batch_size: int, seq_len: int, dtype: str = "fp32", optimizer: str = "adamw",
                   device: str | torch.device = "cpu", microbatches: int = 1, recompute: str | bool = "none",
                   warmup: int = 1, ledger: bool | None = None, seed: int = 0) -> Measurement:
    """Build GPT(cfg) the way `estimate_memory` describes it and measure one training step.

    dtype: fp32; bf16/fp16 (model.to(dtype), optimizer state in that dtype too); *-autocast
    (fp32 model under torch.autocast). The *-mixed modes need a mixed-precision optimizer
    with fp32 master weights (DeepSpeed, the ZeRO lab) and are not measured here.
    """
    if dtype not in MEASURABLE:
        raise ConfigError(f"dtype={dtype!r} is not measurable with a plain PyTorch step; measure one of "
                          f"{', '.join(MEASURABLE)} (mixed precision with fp32 master weights is "
                          "what DeepSpeed does: see the ZeRO lab)")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    if dtype in ("bf16", "fp16"):
        model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float16)
    autocast = dtype.split("-")[0] if dtype.endswith("-autocast") else None
    opt = None
    if optimizer == "adamw":
        opt = make_optimizer(model, TrainConfig())
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    return measure_step(model, opt, x, y, autocast=autocast, warmup=warmup, ledger=ledger,
                        microbatches=microbatches, recompute=recompute)
