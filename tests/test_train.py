"""The shared training step/loop: loss falls, accumulation is exact, results are written; a
non-finite loss stops the run naming the step; fp16 trains through a GradScaler that skips
overflowing steps."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from journey_dist.config import ConfigError, get_preset
from journey_dist.data import get_batch, load_tokens, microbatches
from journey_dist.model import GPT
from journey_dist.runtime import seed_everything
from journey_dist.train import (
    FiniteCheck,
    NonFiniteLossError,
    StepHooks,
    StepResult,
    TrainConfig,
    TrainingError,
    default_loss,
    lr_at,
    make_grad_scaler,
    make_optimizer,
    train,
    train_step,
)


def test_short_run_loss_falls_and_writes_json(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNEY_RUNS_DIR", str(tmp_path))
    seed_everything(0)
    data = load_tokens("handbook")
    model = GPT(get_preset("tiny"))
    cfg = TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, log_every=10)
    history = train(model, data, cfg, lab="test_lab", verbose=False)
    assert history.last_loss < history.first_loss - 1.0, history.steps
    assert history.val_loss < history.first_loss
    saved = json.loads((tmp_path / "test_lab" / "train.json").read_text())
    assert saved["steps"][-1]["step"] == 59 and saved["config"]["steps"] == 60


def test_gradient_accumulation_equals_full_batch():
    data = load_tokens("handbook")
    x, y = get_batch(data.train, 8, 32, step=0)
    results, grads, steps = [], [], []
    for n_micro in (1, 4):
        torch.manual_seed(0)
        model = GPT(get_preset("tiny"))
        opt = make_optimizer(model, TrainConfig())

        def clip_and_capture(params, max_norm):  # the accumulated gradients, before clipping
            grads.append(torch.cat([p.grad.detach().flatten() for p in params]))
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        steps.append(train_step(model, opt, microbatches(x, y, n_micro), StepHooks(clip=clip_and_capture),
                                grad_clip=1.0))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # Adam's first step is ~lr * sign(grad) and clipping rescales, so equal parameters alone would
    # not notice a gradient scaled by n_micro: compare the gradients, their norm and the loss too.
    assert (grads[0] - grads[1]).abs().max().item() < 1e-6
    assert abs(steps[0].grad_norm.item() - steps[1].grad_norm.item()) < 1e-5
    assert abs(steps[0].loss.item() - steps[1].loss.item()) < 1e-6
    assert (results[0] - results[1]).abs().max().item() < 1e-6


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(99, cfg) - 0.1) < 1e-3
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_weight_decay_only_on_matrices():
    model = GPT(get_preset("tiny"))
    decay, no_decay = make_optimizer(model, TrainConfig()).param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] > 0
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0


# --------------------------------------------------------------------- non-finite loss


def _times_at(calls: set[int], factor: float):
    """A loss_fn that multiplies the loss by `factor` on the given (0-based) calls."""
    count = [0]

    def loss_fn(model, x, y):
        loss = default_loss(model, x, y)
        count[0] += 1
        return loss * factor if count[0] - 1 in calls else loss
    return loss_fn


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step():
    """lab 01 --lr 1e6 trained on NaN and crashed later while sampling: now the loop stops at
    the first step with a non-finite loss or gradient norm, naming it and a smaller lr."""
    seed_everything(0)
    model = GPT(get_preset("tiny"))
    cfg = TrainConfig(steps=40, batch_size=8, lr=1e6, log_every=10, eval_batches=1)
    with pytest.raises(NonFiniteLossError, match=r"^step \d+: .*nan.*not finite.*learning rate at that "
                                                 r"step was .*\(lr=1e\+06\): use a smaller learning rate, "
                                                 r"e\.g\. lr=100000$"):
        train(model, load_tokens("handbook"), cfg, verbose=False)
    assert issubclass(NonFiniteLossError, TrainingError)


def test_the_first_nan_step_is_named_and_never_reaches_on_step():
    seed_everything(0)
    saved = []
    cfg = TrainConfig(steps=8, batch_size=4, log_every=4, eval_batches=1)
    with pytest.raises(NonFiniteLossError, match=r"^step 5: the loss is nan and the gradient norm nan"):
        train(GPT(get_preset("tiny")), load_tokens("handbook"), cfg, StepHooks(loss=_times_at({5}, math.nan)),
              verbose=False, on_step=lambda step, *_: saved.append(step))
    assert saved == [0, 1, 2, 3, 4]  # the NaN weights of step 5 were not handed to a checkpointer


def test_on_an_accelerator_the_check_waits_for_a_sync_point_and_names_the_first_bad_step():
    """FiniteCheck(eager=False), the path for CUDA: no read per step, the first bad step kept."""
    check = FiniteCheck(torch.device("cpu"), TrainConfig(lr=0.5, warmup_steps=0), eager=False)
    losses = [1.0, 2.0, math.inf, math.nan, 3.0]
    for step, loss in enumerate(losses):
        check.observe(step, StepResult(torch.tensor(loss), torch.tensor(0.5)))  # no raise yet
    with pytest.raises(NonFiniteLossError, match=r"^step 2: the loss is inf and the gradient norm 0.5, .*"
                                                 r"step was 0.5 \(lr=0.5\)"):
        check.check()
    skipped = FiniteCheck(torch.device("cpu"), TrainConfig(), eager=False)  # an fp16 overflow skip
    skipped.observe(0, StepResult(torch.tensor(1.0), torch.tensor(math.inf), skipped=True, scale=2.0**16))
    skipped.check()


# --------------------------------------------------------------------- fp16 and the GradScaler


def test_fp16_overflowing_step_is_skipped_and_leaves_the_parameters_unchanged():
    """A loss times 1e34 is finite, its gradient scaled by 65536 is not: the scaler skips the
    optimizer step (parameters bitwise unchanged), halves the scale, and the log row says so."""
    data = load_tokens("handbook")
    x, y = get_batch(data.train, 4, 32, step=0)
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    opt = make_optimizer(model, TrainConfig())
    scaler = make_grad_scaler(x.device, "fp16")
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(model, opt, [(x, y)], StepHooks(loss=_times_at({0}, 1e34)), grad_clip=1.0,
                        autocast="fp16", scaler=scaler)
    assert result.skipped and result.scale == 2.0**16 and scaler.get_scale() == 2.0**15
    assert torch.isfinite(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    result = train_step(model, opt, [(x, y)], grad_clip=1.0, autocast="fp16", scaler=scaler)
    assert not result.skipped and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # through train(): the row of the skipped step, and no NonFiniteLossError for its inf norm
    seed_everything(0)
    cfg = TrainConfig(steps=3, batch_size=4, log_every=1, eval_batches=1, autocast="fp16")
    history = train(GPT(get_preset("tiny")), data, cfg, StepHooks(loss=_times_at({1}, 1e34)), verbose=False)
    assert [(r["skipped"], r["scale"]) for r in history.steps] == [(False, 2.0**16), (True, 2.0**16),
                                                                   (False, 2.0**15)]
    assert "grad_norm" not in history.steps[1] and history.skipped_steps == 1


def test_fp16_run_trains_through_the_scaler():
    seed_everything(0)
    cfg = TrainConfig(steps=12, batch_size=4, warmup_steps=2, log_every=4, eval_batches=1, autocast="fp16")
    history = train(GPT(get_preset("tiny")), load_tokens("handbook"), cfg, verbose=False)
    assert history.last_loss < history.first_loss - 1.0, history.steps
    assert history.skipped_steps == 0 and all(r["scale"] == 2.0**16 for r in history.steps)


def test_fp16_without_a_scaler_and_unknown_autocast_are_refused():
    data = load_tokens("handbook")
    x, y = get_batch(data.train, 2, 16, step=0)
    model = GPT(get_preset("tiny"))
    with pytest.raises(ConfigError, match="fp16' needs a loss scaler"):
        train_step(model, make_optimizer(model, TrainConfig()), [(x, y)], autocast="fp16")
    with pytest.raises(ConfigError, match=r"autocast='fp8': use one of \(None, 'bf16', 'fp16'\)"):
        TrainConfig(autocast="fp8")


@pytest.mark.slow
def test_lab_01_with_a_huge_learning_rate_ends_with_the_named_error(tmp_path):
    """Issue 16: lab 01 --lr 1e6 --steps 40 trained 40 steps on NaN, then crashed while sampling.
    Now its last line is the NonFiniteLossError (one `error:` line where the lab catches
    TrainingError, a traceback's last line where it does not) and nothing is sampled."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JOURNEY_RUNS_DIR": str(tmp_path), "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, str(root / "labs" / "01_single_device.py"), "--preset", "tiny",
                          "--lr", "1e6", "--steps", "40"], capture_output=True, text=True, timeout=300,
                         cwd=root, env=env)
    assert out.returncode != 0 and "sample:" not in out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert "NonFiniteLossError" in last or "error:" in last, out.stderr[-2000:]
    assert "step 1: the loss is" in last and "use a smaller learning rate, e.g. lr=100000" in last
