"""runtime.save_json: concurrent writers of one result never fail or leave a torn file."""

import json
import threading

import pytest

from journey_dist.runtime import save_json


def test_concurrent_writers_of_one_result_all_succeed(tmp_path, monkeypatch):
    """4 threads write the same result 100 times each: every write succeeds, the file always
    parses as one writer's whole payload, and no temporary file is left behind. (With one fixed
    NAME.tmp, a writer's os.replace finds the temp file already renamed by another.)"""
    monkeypatch.setenv("JOURNEY_RUNS_DIR", str(tmp_path))
    errors: list[BaseException] = []
    payloads = [{"writer": w, "values": list(range(w * 10))} for w in range(4)]

    def write(payload: dict) -> None:
        for _ in range(100):
            try:
                save_json("lab", "result", payload)
                assert json.loads((tmp_path / "lab" / "result.json").read_text()) in payloads
            except BaseException as e:  # collected: a thread's exception would be lost
                errors.append(e)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} of 400 writes failed, first: {errors[0]!r}"
    assert [p.name for p in (tmp_path / "lab").iterdir()] == ["result.json"]


def test_a_failed_write_leaves_the_old_result_and_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNEY_RUNS_DIR", str(tmp_path))
    save_json("lab", "result", {"ok": 1})
    with pytest.raises(TypeError, match="cannot serialise object"):
        save_json("lab", "result", {"bad": object()})
    assert json.loads((tmp_path / "lab" / "result.json").read_text()) == {"ok": 1}
    assert [p.name for p in (tmp_path / "lab").iterdir()] == ["result.json"]
