"""Lab 01's position-encoding experiment: per-position losses and one row per scheme."""

import math

import torch
import torch.nn.functional as F

from journey_dist.config import POSITIONS
from journey_dist.data import ByteTokenizer, TokenData, get_batch
from journey_dist.extrapolation import (
    extrapolation_config,
    loss_by_position,
    position_extrapolation,
    positions_table,
)
from journey_dist.model import GPT

TEXT = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 60))
DATA = TokenData(TEXT[:2400], TEXT[2400:], ByteTokenizer())


def test_loss_by_position_averages_to_the_model_loss():
    torch.manual_seed(0)
    model = GPT(extrapolation_config().with_(block_size=16, n_layer=1)).eval()
    per_position = loss_by_position(model, DATA.val, batch_size=3, length=16, batches=2, seed=7)
    losses = []
    with torch.no_grad():
        for i in range(2):
            x, y = get_batch(DATA.val, 3, 16, step=i, seed=7)
            losses.append(F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item())
    assert per_position.shape == (16,)
    assert math.isclose(per_position.mean().item(), sum(losses) / 2, rel_tol=1e-5)


def test_one_row_per_scheme_same_batches_same_numbers():
    kw = dict(train_len=8, steps=6, batch_size=4, eval_batches=2)
    base = extrapolation_config().with_(n_layer=1)
    threads = torch.get_num_threads()
    rows = position_extrapolation(DATA, base, **kw)
    assert torch.get_num_threads() == threads  # restored after its one-thread runs
    assert [r["positions"] for r in rows] == list(POSITIONS)
    assert rows[0]["params"] - rows[1]["params"] == 16 * base.n_embd  # only learned has a (2T, C) table
    for r in rows:
        assert r["eval_len"] == 16 and all(math.isfinite(r[k]) for k in (
            "loss_at_train_len", "loss_seen_positions", "loss_unseen_positions"))
    again = position_extrapolation(DATA, base, schemes=["rope"], **kw)[0]
    assert again["loss_unseen_positions"] == rows[2]["loss_unseen_positions"]  # seeded: reproducible
    assert "alibi" in positions_table(rows)
