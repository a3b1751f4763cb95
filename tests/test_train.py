"""The shared training step/loop: loss falls, accumulation is exact, results are written."""

import json

import torch

from journey_dist.config import get_preset
from journey_dist.data import get_batch, load_tokens, microbatches
from journey_dist.model import GPT
from journey_dist.runtime import seed_everything
from journey_dist.train import StepHooks, TrainConfig, lr_at, make_optimizer, train, train_step


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
