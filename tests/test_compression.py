"""compression.py: ZeRO++'s 4x, PowerSGD's element count against torch's own rule, 1-bit Adam."""

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

from journey_dist.compression import (
    one_bit_adam_volume,
    powersgd_defaults,
    powersgd_elements,
    quantized_bytes,
    zero3_step_bytes,
)
from journey_dist.config import ConfigError, get_preset
from journey_dist.model import GPT


def test_zero_plus_plus_cuts_cross_node_bytes_from_3m_to_075m():
    n, m = 7e9, 14e9  # fp16 model size M
    base = zero3_step_bytes(n, gpus_per_node=8)
    assert base["cross_node"] == 3 * m and base["intra_node"] == 0 and base["hpz_extra_memory"] == 0
    full = zero3_step_bytes(n, gpus_per_node=8, qwz=True, hpz=True, qgz=True)
    assert full["cross_node"] == 0.75 * m  # the paper's 4x
    assert full["forward_all_gather"] == m / 2 and full["gradient_reduce"] == m / 4
    assert full["hpz_extra_memory"] == m / 8 and full["intra_node"] == m + m / 4
    assert zero3_step_bytes(n, gpus_per_node=8, qwz=True)["backward_all_gather"] == m / 2  # no hpZ
    assert quantized_bytes(1024, 8, block=256) == 1024 + 4 * 4  # one fp32 scale per block


def test_powersgd_counts_what_torchs_hook_sends():
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in GPT(get_preset("gpt2-small")).parameters()]
    for rank in (1, 4, 64):
        expected = 0
        for shape in shapes:
            n, m = shape[0], (shape[1] if len(shape) > 1 else 1)
            ok, full, small = _should_compress(n, m, min(n, m, rank), 2)
            expected += small if ok else full
        sent, total = powersgd_elements(shapes, rank)
        assert sent == expected and total == sum(torch.Size(s).numel() for s in shapes)
    assert powersgd_defaults() == {"matrix_approximation_rank": 1, "start_powerSGD_iter": 1000,
                                   "min_compression_rate": 2, "use_error_feedback": True}


def test_one_bit_adam_volume_and_bad_input():
    assert one_bit_adam_volume(0.0) == 1 / 16 and one_bit_adam_volume(1.0) == 1
    assert 1 / one_bit_adam_volume(0.15) == pytest.approx(4.92, abs=0.01)
    with pytest.raises(ConfigError, match="warmup_fraction"):
        one_bit_adam_volume(1.5)
    with pytest.raises(ConfigError, match="bits"):
        quantized_bytes(10, 3)
    with pytest.raises(ConfigError, match="rank"):
        powersgd_elements([(4, 4)], 0)
