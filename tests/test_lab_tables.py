"""The pieces labs 02, 05 and 06 print and judge through: report tables that say 'yes'/'NO' or mark a
choice, compose.comm_matches (lab 05's verdict), parity.grad_check and parity.worst_over_ranks (lab 06)."""

import pytest
import torch
import torch.distributed as dist

from journey_dist.parallel.compose import comm_matches
from journey_dist.parity import RunResult, grad_check, worst_over_ranks
from journey_dist.report import buckets_table, ledger_tables, mesh_comm_table
from tests.dist import run_ranks

MIB = 2**20


def test_buckets_table_marks_the_chosen_cap_and_shows_ddp_layouts():
    text = buckets_table({0.5: [MIB // 2] * 8, 25.0: [4 * MIB]}, 0.5,
                         {"first_iteration": [4 * MIB], "rebuilt": [MIB, 3 * MIB]}, show=3)
    lines = text.splitlines()
    assert lines[1].split() == ["cap", "0.5", "MiB", "(chosen)", "8", "4.000", *["0.50,"] * 3, "..."]
    assert lines[2].split()[:4] == ["cap", "25", "MiB", "1"]  # one bucket: one all-reduce per step
    assert lines[3].startswith("DDP first iteration") and lines[4].startswith("DDP rebuilt")
    assert lines[4].rstrip().endswith("1.00, 3.00")


def _row(rank: int, tp_bytes: float, steps: int) -> dict:
    return {"rank": rank, "coords": {"pp": 0, "dp": 0, "tp": rank},
            "comm": {"tp": {"all_reduce": {"calls": 4, "bytes": tp_bytes * steps, "wire_bytes": 0.0}}},
            "expected": {"tp": {"all_reduce": 100}, **({"pp": {"send": 8}} if rank == 0 else {})}}


def test_mesh_comm_table_and_comm_matches_flag_a_rank_off_its_formula():
    rows = [_row(0, 100, 3), _row(1, 100, 3)]
    rows[0]["comm"]["pp"] = {"send": {"calls": 3, "bytes": 24, "wire_bytes": 24.0}}
    assert comm_matches(rows, 3)
    lines = mesh_comm_table(rows, 3).splitlines()
    assert lines[1].split() == ["rank", "pp,dp,tp", "tp", "all_reduce", "pp", "send", "match"]
    assert lines[2].split() == ["0", "0,0,0", "100", "/", "100", "8", "/", "8", "yes"]  # ledger / 3 steps
    assert lines[3].split() == ["1", "0,0,1", "100", "/", "100", "-", "yes"]  # no pp send in its formula
    rows[1]["comm"]["tp"]["all_reduce"]["bytes"] = 101 * 3  # one byte per step more than the formula
    assert not comm_matches(rows, 3)
    assert mesh_comm_table(rows, 3).splitlines()[3].rstrip().endswith("NO")
    rows = [_row(0, 100, 3)]  # a modelled collective that never ran is a mismatch too
    assert not comm_matches(rows, 3) and mesh_comm_table(rows, 3).splitlines()[2].endswith("NO")


def test_ledger_tables_list_collectives_without_a_formula_apart():
    row = {"calls": 1, "bytes": 64, "wire_bytes": 64.0}
    text = ledger_tables({"ours": ({"all_reduce": row, "barrier": {**row, "bytes": 0}},
                                   {"all_reduce": {"calls": 1, "bytes": 64}}),
                          "library": ({"all_gather": row}, {})})
    modelled, rest = text.split("measured, no formula derived:\n")
    assert "ours" in modelled and "all_reduce" in modelled and "yes" in modelled
    assert "barrier" not in modelled and "library" not in modelled and "NO" not in modelled
    listed = [line.split()[:2] for line in rest.splitlines()[1:]]
    assert listed == [["ours", "barrier"], ["library", "all_gather"]]


def test_grad_check_compares_grads_else_the_global_norm():
    ref = RunResult("ddp", [1.0], {}, grads={"w": torch.tensor([3.0, 4.0])})  # norm 5
    kept = RunResult("zero", [1.0], {}, grads={"w": torch.tensor([3.0, 4.5])})
    assert grad_check(kept, ref) == ("max|g|", 0.5)
    norm_only = RunResult("deepspeed", [1.0], {}, grad_norm=5.5)
    kind, rel = grad_check(norm_only, ref)
    assert kind == "rel norm" and abs(rel - 0.1) < 1e-6
    assert grad_check(RunResult("accelerate", [1.0], {}), ref) == ("-", None)


def _worst(values_by_rank: list[dict]) -> dict:
    return worst_over_ranks(values_by_rank[dist.get_rank()])


@pytest.mark.slow  # two spawned ranks: ~5 s on a quiet box, 25 s under load
def test_worst_over_ranks_takes_the_max_and_keeps_none():
    ranks = [{"loss": 1e-7, "grad": None, "param": 3e-6}, {"loss": 2e-7, "grad": None, "param": 1e-6}]
    results = run_ranks(_worst, 2, ranks, timeout_s=60)
    assert results[0] == results[1]
    assert results[0]["grad"] is None
    assert abs(results[0]["loss"] - 2e-7) < 1e-12 and abs(results[0]["param"] - 3e-6) < 1e-11
