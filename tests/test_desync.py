"""Desynchronised collectives and their diagnosis (journey_dist/desync.py, notes/debugging.md).

Default: the pure parts (pairing by order, the flight-recorder comparison on hand-built dumps, the
gloo dump repair, bad input). Slow: real 2-rank gloo jobs in subprocesses, each scenario with
TORCH_DISTRIBUTED_DEBUG off and DETAIL, the flight recorder on the skip case, torchfrtrace.
"""

from __future__ import annotations

import pickle

import pytest

from journey_dist.config import ConfigError
from journey_dist.desync import (
    TRACE_PREFIX,
    first_divergence,
    load_traces,
    pair_by_order,
    repair_gloo_dump,
    run_desync,
    short_error,
    step_calls,
    straggler_probability,
    torchfrtrace,
)
from tests.labs import run_lab

DETAIL_TEXT = ("Detected mismatch between collectives on ranks. Rank 0 is running collective: "
               "CollectiveFingerPrint(SequenceNumber=2, OpType=ALLREDUCE, TensorShape=[4], "
               "TensorDtypes=Float, TensorDeviceTypes=TensorOptions(dtype=float (default), device=cpu)), "
               "but Rank 1 is running collective: "
               "CollectiveFingerPrint(SequenceNumber=2, OpType=ALLREDUCE, TensorShape=[6], "
               "TensorDtypes=Float, TensorDeviceTypes=TensorOptions(dtype=float (default), device=cpu))."
               "Collectives differ in the following aspects: \t Tensor Tensor shapes: 4vs 6")
GLOO_TEXT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] "
             "Connection closed by peer [127.0.0.1]:1754. This is typically caused by a remote worker "
             "crashing. Check the logs.")


def _entry(seq: int, op: str = "all_reduce", sizes=((4,),), line: int = 10, group: str = "0") -> dict:
    return {"collective_seq_id": seq, "profiling_name": f"gloo:{op}", "input_sizes": [list(s) for s in sizes],
            "input_dtypes": ["Float"] * len(sizes), "process_group": (group, "default_pg"), "is_p2p": False,
            "frames": [{"name": op, "filename": "/x/site-packages/torch/distributed/c10d.py", "line": 1},
                       {"name": "step", "filename": "/home/me/train.py", "line": line}]}


def _dump(*entries: dict) -> dict:
    return {"version": "2.10", "pg_config": {"": {"name": "", "desc": "", "ranks": "[0, 1]"}},
            "entries": list(entries)}


def test_skipped_all_reduce_pairs_by_order_and_returns_a_wrong_sum():
    intended = {"grads": 2.0, "loss": 21.0}
    assert pair_by_order(step_calls("none")) == {0: intended, 1: intended}
    # rank 1's loss meets rank 0's gradients; rank 0's loss finds no partner
    assert pair_by_order(step_calls("skip")) == {0: {"grads": 12.0, "loss": None}, 1: {"loss": 12.0}}


@pytest.mark.parametrize("rank1, kind, seq", [
    ([_entry(1), _entry(2)], None, None),  # the same program: no divergence
    ([_entry(1)], "missing", 2),
    ([_entry(1), _entry(2, op="all_gather")], "mismatch", 2),
    ([_entry(1), _entry(2, sizes=((6,),))], "mismatch", 2),
    ([_entry(1, line=11), _entry(2, line=11)], "call site", 1),  # same op and shape, another line
])
def test_first_divergence_names_the_first_differing_collective(rank1, kind, seq):
    found = first_divergence({0: _dump(_entry(1), _entry(2)), 1: _dump(*rank1)})
    if kind is None:
        assert found is None
        return
    assert (found["kind"], found["seq"]) == (kind, seq)
    assert found["ranks"][0] == "gloo:all_reduce [[4]] at train.py:10 (step)"  # torch's own frames skipped
    if kind == "missing":
        assert found["ranks"][1] == "never issued"


def test_straggler_probability():
    assert straggler_probability(0.5, 2) == 0.75 and straggler_probability(0.0, 10**6) == 0.0
    assert straggler_probability(1e-3, 1024) == pytest.approx(0.641, abs=1e-3)
    with pytest.raises(ConfigError, match="need 0 <= p_slow <= 1 and ranks >= 1"):
        straggler_probability(1.5, 8)


def test_short_error_keeps_the_verdict():
    assert short_error(DETAIL_TEXT) == ("mismatch (rank 0: #2 ALLREDUCE [4]; rank 1: #2 ALLREDUCE [6]): "
                                        "Tensor Tensor shapes: 4vs 6")
    assert short_error(GLOO_TEXT) == "Connection closed by peer [127.0.0.1]:1754."


def test_repair_keys_pg_config_by_the_entries_group(tmp_path):
    raw, fixed = tmp_path / "raw", tmp_path / "fixed"
    raw.mkdir()
    for rank in (0, 1):
        (raw / f"{TRACE_PREFIX}{rank}").write_bytes(pickle.dumps(_dump(_entry(1))))
    repair_gloo_dump(raw, fixed)
    traces = load_traces(fixed)
    assert set(traces) == {0, 1}
    assert traces[1]["pg_config"] == {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1]"}}
    assert traces[1]["entries"] == load_traces(raw)[1]["entries"]


@pytest.mark.parametrize("kwargs, match", [
    ({"scenario": "deadlock"}, r"unknown desync scenario 'deadlock'; use one of op, shape, skip, straggler"),
    ({"scenario": "op", "debug": "VERBOSE"}, r"DEBUG='VERBOSE'; use one of OFF, INFO, DETAIL"),
    ({"scenario": "op", "debug": "DETAIL", "trace_dir": "x"}, r"trace with debug='OFF'"),
])
def test_bad_desync_request_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run_desync(**kwargs)


# ----------------------------------------------------------------------------- real jobs (slow)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    trace = tmp_path_factory.mktemp("fr") / "skip"
    out = {(s, d): run_desync(s, debug=d, collective_timeout_s=2.0)
           for s in ("op", "shape") for d in ("OFF", "DETAIL")}
    out[("skip", "DETAIL")] = run_desync("skip", debug="DETAIL", collective_timeout_s=2.0)
    out[("straggler", "DETAIL")] = run_desync("straggler", debug="DETAIL", collective_timeout_s=2.0)
    out[("skip", "OFF")] = run_desync("skip", trace_dir=trace, collective_timeout_s=2.0)
    out["trace"] = trace
    return out


@pytest.mark.slow
def test_detail_names_the_mismatched_op_and_shape(runs):
    aspects = {"op": "Op type: ALLREDUCEvs _ALLGATHER_BASE", "shape": "Tensor shapes: 4vs 6"}
    for scenario, aspect in aspects.items():
        rank0 = runs[(scenario, "DETAIL")]["ranks"][0]
        assert rank0["error"].startswith("RuntimeError: Detected mismatch between collectives on ranks.")
        assert aspect in rank0["error_text"], rank0["error_text"]
        assert "SequenceNumber=2" in rank0["error_text"]  # two warm-up collectives: 0 and 1


@pytest.mark.slow
def test_without_detail_nothing_names_the_mismatch(runs):
    op = runs[("op", "OFF")]["ranks"]
    assert "Timed out waiting 2000ms" in op[0]["error"] and "mismatch" not in op[0]["error_text"]
    shape = runs[("shape", "OFF")]  # gloo's own size check aborts the process (SIGABRT), no traceback
    assert "exit code -6" in shape["job_error"]
    assert any("Is there a distributed collective mismatch in your code?" in a for a in shape["aborts"])


@pytest.mark.slow
def test_skip_is_a_silent_wrong_sum_that_only_the_stack_shows(runs):
    wrong = pair_by_order(step_calls("skip"))[1]["loss"]
    for debug in ("OFF", "DETAIL"):
        rank1 = runs[("skip", debug)]["ranks"][1]
        assert rank1["error"] is None and rank1["result"][4:] == [wrong] * 4  # no error, wrong loss
    for scenario in ("skip", "straggler"):  # DETAIL names the rank that never arrives
        assert "Ranks 1 failed to pass monitoredBarrier" in runs[(scenario, "DETAIL")]["ranks"][0]["error"]
    found = first_divergence(load_traces(runs["trace"]))
    assert (found["kind"], found["seq"]) == ("call site", 3), found  # 2 warm-up collectives, then the skip
    assert all("desync.py" in where for where in found["ranks"].values())


@pytest.mark.slow
def test_torchfrtrace_needs_the_repaired_gloo_dump(runs, tmp_path):
    raw = torchfrtrace(runs["trace"])
    assert raw.returncode != 0 and "KeyError: ('0', 0)" in raw.stderr
    fixed = torchfrtrace(repair_gloo_dump(runs["trace"], tmp_path / "fixed"))
    report = fixed.stdout + fixed.stderr
    assert fixed.returncode == 0 and "Not all ranks joining collective" in report
    assert "missing ranks: {1}" in report


@pytest.mark.slow
def test_lab10_desync_and_flight_recorder_cells(tmp_path):
    out, r = run_lab("10_reliability", "--preset", "tiny", "--steps", "6", "--every", "2", "--crash-at", "4",
                     "--desync", "skip", "--desync-timeout", "2", runs_dir=tmp_path)
    saw = {(row["debug"], row["rank"]): row["saw"] for row in r["desync"]}
    assert saw[("OFF", 1)] == saw[("DETAIL", 1)] == "no error; loss 12 (intended 21)"
    assert "Ranks 1 failed to pass monitoredBarrier in 2000 ms" in saw[("DETAIL", 0)]
    found = r["flight_recorder"]["first_divergence"]
    assert (found["kind"], found["seq"]) == ("call site", 3)
    assert r["flight_recorder"]["torchfrtrace_raw"] == "KeyError: ('0', 0)"
    assert "missing ranks: {1}" in r["flight_recorder"]["torchfrtrace"]
    assert "no error; loss 12 (intended 21)" in out and found["ranks"]["1"] in out
