"""`journey notebooks`: each lab becomes a notebook holding the lab's code cell for cell, the Colab cell
installs only on Colab, arguments reach the lab's parser, and a file the command did not write (or one
edited since) is never replaced. Slow: labs 02 and 03 run as notebooks in a real Jupyter kernel and
their JSON holds the claims the plain-python runs hold."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import nbformat
import pytest
import torch
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from journey_dist.cli import main
from journey_dist.config import ConfigError
from journey_dist.notebooks import (
    ARGS_ENV,
    LABS_DIR,
    SOURCE_ENV,
    colab_install_cell,
    default_source,
    find_labs,
    notebook_for,
    write_notebooks,
)
from tests.labs import ROOT, assert_lab02_claims, assert_lab03_claims

FAKE_LAB = '''"""Lab 99: a *fake* lab for <tests>.

    python labs/99_fake.py --steps 2

Prose with `code <kept>` and dp*tp.
"""

# %% Setup
import sys

x = 1


# %% What every rank runs
def rank_main():
    y = x + 1
    # %% an inner step: a cell cannot start inside a function
    return y


# %% [markdown]
# Some *markdown* text.

# %% Launch
if __name__ == "__main__":
    print("rank_main ->", rank_main(), sys.argv[1:])
'''


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_a_lab_becomes_markdown_setup_cells_and_its_own_cells(tmp_path, monkeypatch, capsys):
    lab = tmp_path / "99_fake.py"
    lab.write_text(FAKE_LAB)
    nb, code_cells, inner = notebook_for(lab, source="")
    nbformat.validate(nb)
    assert (code_cells, inner) == (3, 1)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(
        "# Lab 99: a \\*fake\\* lab for \\<tests>.\n\n```bash\npython labs/99_fake.py --steps 2\n```\n\n"
        "Prose with `code <kept>` and dp\\*tp.\n")
    kinds = [(c.cell_type, c.source.splitlines()[0]) for c in nb.cells[1:]]
    assert kinds == [("code", "# Colab only: install journey-dist, keeping Colab's own torch. Anywhere else "
                      "this cell does nothing."),
                     ("code", "# The lab's arguments: what you would type after `python labs/99_fake.py` "
                      '(e.g. "--preset tiny --steps 2").'),
                     ("markdown", "## Setup"), ("code", "import sys"),
                     ("markdown", "## What every rank runs"), ("code", "def rank_main():"),
                     ("markdown", "Some *markdown* text."),
                     ("markdown", "## Launch"), ("code", 'if __name__ == "__main__":')]
    assert "    # %% an inner step" in nb.cells[6].source  # a comment inside its function, not a cell
    # run the code cells in order in one namespace, as a kernel does
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    monkeypatch.setenv(ARGS_ENV, "--steps 2 --name 'a b'")
    namespace = {"__name__": "__main__"}
    for source in _code(nb):
        exec(source, namespace)
    assert capsys.readouterr().out == "rank_main -> 2 ['--steps', '2', '--name', 'a b']\n"


def test_every_lab_notebook_is_valid_and_holds_the_labs_code_line_for_line():
    for lab in find_labs([]):
        nb, code_cells, inner = notebook_for(lab, source="")
        nbformat.validate(nb)
        text = lab.read_text()
        doc = ast.parse(text).body[0]
        lines = text.splitlines()
        script = [line for i, line in enumerate(lines, 1) if line.strip() and not line.startswith("# %%")
                  and not doc.lineno <= i <= doc.end_lineno]
        cells = _code(nb)[2:]  # after the Colab and the arguments cells
        assert len(cells) == code_cells and [line for c in cells for line in c.splitlines() if line.strip()] \
            == script, lab.name
        for source in cells:
            compile(source, lab.name, "exec")  # no cell cuts a block in two
        titles = [line[4:].strip() for line in lines if line.startswith("# %% ")]
        headings = [c.source[3:].replace("\\", "") for c in nb.cells if c.source.startswith("## ")]
        assert headings == titles, lab.name
        assert inner == sum(line.lstrip().startswith("# %%") and line[0] == " " for line in lines)
        assert nb.cells[0].source.startswith(f"# Lab {lab.name[:2]}"), lab.name


def test_colab_cell_installs_on_colab_only_and_keeps_colabs_torch(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: calls.append(cmd))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(SOURCE_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    url = "git+https://example.invalid/you/journey-dist.git"
    exec(colab_install_cell(url), {})
    exec(colab_install_cell(""), {})
    assert calls == []  # a plain kernel: nothing installed, nothing asked
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    with pytest.raises(RuntimeError, match=f"Set {SOURCE_ENV}"):
        exec(colab_install_cell(""), {})
    exec(colab_install_cell(url), {})
    pin = Path(calls[0][calls[0].index("-c") + 1])
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-c", str(pin), url]]
    assert pin.read_text() == f"torch=={torch.__version__}\n"
    monkeypatch.setenv(SOURCE_ENV, "/content/journey-dist")  # the environment wins over the default
    exec(colab_install_cell(url), {})
    assert calls[-1][-1] == "/content/journey-dist"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="reads pyproject.toml with tomllib (Python 3.11+)")
def test_default_source_is_the_repository_url_and_none_is_invented(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n[project.urls]\nRepository = "https://example.invalid/x"\n')
    assert default_source(pyproject) == "git+https://example.invalid/x"
    pyproject.write_text('[project]\nname = "x"\n')
    assert default_source(pyproject) == ""
    assert default_source(tmp_path / "missing.toml") == ""
    urls = "urls" in (ROOT / "pyproject.toml").read_text()  # this repository names no URL today
    nb, _, _ = notebook_for(LABS_DIR / "02_data_parallel.py", default_source())
    assert urls or f'os.environ.get("{SOURCE_ENV}", "")' in _code(nb)[0]


def test_regenerating_rewrites_nothing_and_foreign_or_edited_files_are_left_alone(tmp_path):
    labs = find_labs(["02", "03_tensor_parallel"])
    out = tmp_path / "nb"
    assert [w.changed for w in write_notebooks(labs, out, source="")] == [True, True]
    ours = out / "02_data_parallel.ipynb"
    before, mtime = ours.read_text(), ours.stat().st_mtime_ns
    assert [w.changed for w in write_notebooks(labs, out, source="")] == [False, False]
    assert ours.read_text() == before and ours.stat().st_mtime_ns == mtime

    ran = json.loads(before)  # run in Jupyter and saved: outputs, same sources -> still ours
    ran["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    ours.write_text(json.dumps(ran))
    assert write_notebooks(labs, out, source="")[0].changed and ours.read_text() == before

    edited = json.loads(before)
    edited["cells"][4]["source"] = ["# my own change\n"]
    ours.write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match="edited after"):
        write_notebooks(labs, out, source="")
    assert json.loads(ours.read_text()) == edited

    ours.write_text(before)
    foreign = out / "03_tensor_parallel.ipynb"
    foreign.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    with pytest.raises(ConfigError, match="not written by"):  # checked before 02 is rewritten
        write_notebooks(labs, out, source="git+https://example.invalid/x.git")
    assert ours.read_text() == before and json.loads(foreign.read_text())["cells"] == []
    with pytest.raises(ConfigError, match="is a file"):
        write_notebooks(labs, foreign, source="")


def test_cli_writes_notebooks_and_exits_2_on_a_foreign_file_or_unknown_lab(tmp_path, capsys):
    url = "git+https://example.invalid/you/journey-dist.git"
    assert main(["notebooks", "--out", str(tmp_path), "--source", url, "02"]) == 0
    assert f"wrote {tmp_path / '02_data_parallel.ipynb'}: 7 code cells" in capsys.readouterr().out
    nb = nbformat.read(tmp_path / "02_data_parallel.ipynb", as_version=4)
    assert f'os.environ.get("{SOURCE_ENV}", "{url}")' in _code(nb)[0]
    (tmp_path / "03_tensor_parallel.ipynb").write_text("my notes")
    assert main(["notebooks", "--out", str(tmp_path), "03"]) == 2
    assert "not written by `journey notebooks`" in capsys.readouterr().err
    assert (tmp_path / "03_tensor_parallel.ipynb").read_text() == "my notes"
    assert main(["notebooks", "--out", str(tmp_path), "99"]) == 2
    assert "lab '99' matches no lab" in capsys.readouterr().err


# ------------------------------------------------------------------ slow: a real Jupyter kernel

LAB_ARGS = {  # the plain-python tests' small settings
    "02_data_parallel": ("--preset tiny --steps 3 --batch-size 8 --bucket-mb 0.05", assert_lab02_claims),
    "03_tensor_parallel": ("--preset tiny --steps 3 --batch-size 8 --new-tokens 8", assert_lab03_claims),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("lab", sorted(LAB_ARGS))
def test_lab_runs_as_a_notebook_in_a_jupyter_kernel(tmp_path, lab):
    (w,) = write_notebooks(find_labs([lab]), tmp_path / "notebooks", source="")
    # A python3 kernel spec of this interpreter (the venv), in a directory of its own
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (journey-dist test)", "language": "python"}))
    km = KernelManager(kernel_name="python3",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))
    args, check = LAB_ARGS[lab]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOURNEY_RUNS_DIR": str(tmp_path / "runs"), ARGS_ENV: args}
    nb = nbformat.read(w.path, as_version=4)
    client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=env)  # the kernel starts in tmp_path, with env
    finally:
        km.shutdown_kernel(now=True)
    print(f"{lab} as a notebook: {time.perf_counter() - t0:.1f} s")

    result = json.loads((tmp_path / "runs" / lab / "result.json").read_text())
    assert result["preset"] == "tiny"  # the arguments cell reached the lab's parser
    check(result)
    shown = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"wrote {tmp_path / 'runs' / lab / 'result.json'}" in shown  # rank 0's prints reach the notebook
