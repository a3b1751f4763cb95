"""The pp x dp x cp x tp mesh arithmetic: pure functions, checked without a process group."""

import itertools

import pytest

from journey_dist.config import ConfigError, ParallelConfig
from journey_dist.mesh import all_groups, coords_rank, layout_text, rank_coords


@pytest.mark.parametrize("dp,cp,tp,pp", [(1, 1, 1, 1), (2, 1, 2, 2), (2, 2, 2, 1), (3, 2, 1, 2)])
def test_coordinates_round_trip_and_tp_varies_fastest(dp, cp, tp, pp):
    pcfg = ParallelConfig(dp=dp, cp=cp, tp=tp, pp=pp)
    seen = []
    for rank in range(pcfg.world_size):
        c = rank_coords(rank, pcfg)
        assert coords_rank(c["pp"], c["dp"], c["tp"], pcfg, cp=c["cp"]) == rank
        seen.append((c["pp"], c["dp"], c["cp"], c["tp"]))
    assert seen == list(itertools.product(range(pp), range(dp), range(cp), range(tp)))  # lexicographic


def test_context_parallel_groups_sit_between_tp_and_dp():
    pcfg = ParallelConfig(dp=2, cp=2, tp=2)
    assert pcfg.world_size == 8
    assert all_groups("tp", pcfg) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all_groups("cp", pcfg) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert all_groups("dp", pcfg) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    text = layout_text(pcfg)
    assert "cp=2" in text and "cp groups" in text and "dp0: [0, 1] [2, 3]" in text


def test_world_size_message_names_cp_when_it_splits():
    with pytest.raises(ConfigError, match=r"dp\*cp\*tp\*pp = 1\*2\*2\*1 = 4 but the world has 2"):
        ParallelConfig(cp=2, tp=2).validate(world_size=2)
    with pytest.raises(ConfigError, match=r"cp=0 must be a positive integer"):
        ParallelConfig(cp=0).validate()
