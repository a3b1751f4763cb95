"""The loop's contract (StepHooks) and the parity helpers every scheme's checks rest on."""

import pytest
import torch

from journey_dist.config import ConfigError, get_preset
from journey_dist.data import load_tokens
from journey_dist.parity import fresh_model, max_abs_diff, measure_one_step, reference_run, run_and_capture
from journey_dist.train import StepHooks, TrainConfig, make_optimizer, train


def test_an_unknown_hook_is_an_error():
    with pytest.raises(TypeError, match="clip_fn"):
        StepHooks(clip_fn=lambda params, max_norm: None)
    with pytest.raises(TypeError, match=r"unknown hook\(s\) \['loss_fn'\]; StepHooks has: loss, eval_loss"):
        StepHooks().with_(loss_fn=lambda m, x, y: None)


def test_then_sync_runs_the_scheme_sync_first():
    calls = []
    hooks = StepHooks(sync_grads=lambda: calls.append("scheme")).then_sync(lambda: calls.append("capture"))
    hooks.sync_grads()
    assert calls == ["scheme", "capture"]


def test_a_subset_comparison_must_compare_something():
    ref = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match="nothing to compare"):
        max_abs_diff({}, ref, subset=True)  # returned 0.0 before: a pipeline check passed vacuously
    with pytest.raises(KeyError, match="not compared"):
        max_abs_diff({"a": torch.ones(2)}, ref, subset=True, cover=["a", "b"])
    assert max_abs_diff({"a": torch.ones(2)}, ref, subset=True, cover=["a"]) == 1.0


def test_eval_every_records_its_own_step():
    """The validation loss of step 3 used to land on the last *logged* row (step 0 with log_every=5)."""
    cfg = TrainConfig(steps=7, batch_size=2, log_every=5, eval_every=3, eval_batches=1, warmup_steps=1)
    model = fresh_model(get_preset("tiny"))
    history = train(model, load_tokens("handbook"), cfg, verbose=False)
    assert [e["step"] for e in history.evals] == [3, 6]
    assert all("val_loss" not in row for row in history.steps)
    assert history.evals[-1]["val_loss"] == history.val_loss


def test_run_and_capture_keeps_first_grads_and_norm():
    cfg = TrainConfig(steps=2, batch_size=2, warmup_steps=1, eval_batches=1)
    run = reference_run(get_preset("tiny"), load_tokens("handbook"), cfg, first_grads=True)
    assert set(run.grads) == set(run.params) and len(run.losses) == 2
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in run.grads.values())).item()
    assert run.grad_norm == pytest.approx(norm, rel=1e-5)


def test_measure_one_step_of_one_process_sends_nothing():
    cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=1, eval_batches=1)
    model = fresh_model(get_preset("tiny"))
    run = run_and_capture(model, load_tokens("handbook"), cfg, optimizer=(opt := make_optimizer(model, cfg)))
    ledger = measure_one_step(model, opt, load_tokens("handbook"), cfg)
    assert ledger.records == [] and run.losses


def test_fp16_is_refused_where_gradients_are_sharded():
    """A GradScaler on ZeRO/FSDP would see only this rank's slice and skip steps on its own."""
    cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=1, eval_batches=1, autocast="fp16")
    with pytest.raises(ConfigError, match="shards gradients over ranks"):
        train(fresh_model(get_preset("tiny")), load_tokens("handbook"), cfg, StepHooks(whole_grads=False),
              verbose=False)
