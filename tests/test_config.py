"""Bad configurations fail early with a message that names the problem and the fix."""

import pytest

from journey_dist.config import ConfigError, GPTConfig, ParallelConfig, get_preset

MINI = get_preset("gpt-mini")


@pytest.mark.parametrize(
    "pcfg, kwargs, message",
    [
        (ParallelConfig(tp=3), {"model": MINI}, r"tp=3 does not divide n_head=4"),
        (ParallelConfig(tp=2), {"model": MINI.with_(vocab_size=257)},
         r"tp=2 does not divide vocab_size=257; pad the vocabulary to 258"),
        (ParallelConfig(dp=2, tp=2), {"world_size": 2}, r"dp\*tp\*pp = 2\*2\*1 = 4 but the world has 2"),
        (ParallelConfig(pp=8, microbatches=8), {"model": MINI}, r"pp=8 is larger than n_layer=4"),
        (ParallelConfig(pp=4, microbatches=2), {}, r"microbatches=2 < pp=4"),
        (ParallelConfig(zero=1), {}, r"zero=1 shards over data-parallel ranks and needs dp > 1"),
        (ParallelConfig(zero=4, dp=2), {}, r"zero=4 is not a ZeRO stage"),
        (ParallelConfig(sequence_parallel=True), {}, r"sequence_parallel needs tp > 1"),
        (ParallelConfig(dp=2, microbatches=2), {"global_batch": 6}, r"global batch 6 is not divisible"),
        (ParallelConfig(dp=0), {}, r"dp=0 must be a positive integer"),
        (ParallelConfig(schedule="zigzag"), {}, r"schedule='zigzag'"),
    ],
)
def test_parallel_config_errors(pcfg, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        pcfg.validate(**kwargs)


def test_valid_parallel_config_passes():
    pcfg = ParallelConfig(dp=2, tp=2, pp=2, microbatches=4, zero=1)
    assert pcfg.validate(model=MINI, world_size=8, global_batch=16) is pcfg
    assert pcfg.world_size == 8


def test_gpt_config_errors():
    with pytest.raises(ConfigError, match=r"n_embd=100 is not divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ConfigError, match=r"attn_impl='flash2'"):
        GPTConfig(attn_impl="flash2")
    with pytest.raises(ConfigError, match=r"n_layer=0 must be a positive integer"):
        GPTConfig(n_layer=0)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown preset 'gpt5'.*gpt-mini.*gpt2-small"):
        get_preset("gpt5")


def test_preset_override():
    assert get_preset("gpt-mini", n_layer=2).n_layer == 2
    assert get_preset("gpt2-small").head_dim == 64
