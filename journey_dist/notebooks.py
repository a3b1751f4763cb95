"""Labs as Jupyter notebooks: `journey notebooks` turns each `labs/NN_name.py` into `NN_name.ipynb`.

jupytext reads the lab's `# %%` percent-format cells. The notebook gets, in order: the lab's
docstring as a markdown cell; a cell that installs journey-dist on Colab (and does nothing anywhere
else); a cell that sets the lab's command-line arguments; then each lab cell, its `# %% Title` as a
markdown heading. A `# %%` indented inside a function cannot start a cell (the function would be cut
in two), so it stays a comment in its function's cell.

The command writes only notebooks it generated: a file already at the target path must carry this
generator's metadata marker and be unedited since (same cell sources as written), else it is left alone
and the run stops with a ConfigError. Regenerating an unchanged lab leaves its notebook untouched.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from journey_dist.config import ConfigError

try:  # tomllib is in the standard library from Python 3.11; on 3.10 there is no default source
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None

try:  # the [notebooks] extra: pip install -e ".[notebooks]"
    import jupytext
    import nbformat
except ModuleNotFoundError:  # notebook_for/write_notebooks say how to install it
    jupytext = nbformat = None

ROOT = Path(__file__).resolve().parents[1]
LABS_DIR = ROOT / "labs"
GENERATOR = "journey notebooks"  # the marker in metadata["journey_dist"]["generator"]
SOURCE_ENV = "JOURNEY_DIST_SOURCE"  # where Colab's pip installs journey-dist from
ARGS_ENV = "JOURNEY_LAB_ARGS"  # the lab's command-line arguments inside a notebook

_INDENTED_MARKER = re.compile(r"^(\s+)# %%")
_MASK = "# journey-notebooks: indented cell marker %%"  # a comment jupytext does not split at
# A top-level `# %% Title`: jupytext would read `key=value` or `[markdown]` in a title as cell options,
# so a plain title is swapped for its index (`# %% journey_title=3`) and put back from the lab's text.
_TITLED_MARKER = re.compile(r"^# %%[ \t]+([^\s\[].*?)\s*$")


@dataclass(frozen=True)
class Written:
    """What `write_notebooks` did with one lab."""

    lab: Path
    path: Path
    changed: bool  # False: the notebook on disk was already this one
    code_cells: int  # the lab's own code cells
    inner_markers: int  # `# %%` lines inside blocks, kept as comments


def find_labs(names: list[str], labs_dir: Path = LABS_DIR) -> list[Path]:
    """The lab scripts named by `names` ("02", "02_data_parallel", or a path to a .py); all if empty."""
    if not labs_dir.is_dir() and not all(Path(n).suffix == ".py" for n in names or ["?"]):
        raise ConfigError(f"no labs directory at {labs_dir}: `journey notebooks` reads labs/ from a clone "
                          "of the repository; run it from a clone installed with `pip install -e .`, "
                          "or pass paths to lab .py files")
    every = sorted(labs_dir.glob("[0-9][0-9]_*.py")) if labs_dir.is_dir() else []
    if not names:
        return every
    found = []
    for name in names:
        if name.endswith(".py") and Path(name).is_file():
            found.append(Path(name))
            continue
        matches = [p for p in every if p.stem == name or p.stem.startswith(f"{name}_")]
        if len(matches) != 1:
            raise ConfigError(f"lab {name!r} matches {[p.stem for p in matches] or 'no lab'}; name one "
                              f"of {[p.stem for p in every]} (or its number), or a path to a .py file")
        found.append(matches[0])
    return found


def default_source(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """A pip source for journey-dist: `git+` the `Repository` in [project.urls], or "" if none."""
    if tomllib is None or not pyproject.is_file():
        return ""
    urls = tomllib.loads(pyproject.read_text()).get("project", {}).get("urls", {})
    url = urls.get("Repository", "")
    return url if not url or url.startswith("git+") else f"git+{url}"


def colab_install_cell(source: str) -> str:
    """The first code cell: installs journey-dist on Colab, keeping Colab's own (CUDA) torch."""
    return f'''\
# Colab only: install journey-dist, keeping Colab's own torch. Anywhere else this cell does nothing.
# JOURNEY_DIST_SOURCE is what pip installs: a git URL ("git+https://<host>/<you>/journey-dist.git")
# or the path of a clone you uploaded or mounted (e.g. "/content/journey-dist").
import importlib
import os
import subprocess
import sys
import tempfile

JOURNEY_DIST_SOURCE = os.environ.get("{SOURCE_ENV}", {json.dumps(source)})
if "google.colab" in sys.modules:
    if not JOURNEY_DIST_SOURCE:
        raise RuntimeError("Set JOURNEY_DIST_SOURCE in this cell (or os.environ['{SOURCE_ENV}']) to a "
                           "git URL or a clone's path for journey-dist, then run the cell again.")
    import torch  # pin the installed build, so pip cannot replace Colab's CUDA torch

    pin = os.path.join(tempfile.gettempdir(), "journey-dist-torch.txt")
    with open(pin, "w") as f:
        f.write(f"torch=={{torch.__version__}}\\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", pin, JOURNEY_DIST_SOURCE], check=True)
    importlib.invalidate_caches()
'''


def arguments_cell(lab: str) -> str:
    """The cell that gives the lab its command line: in a kernel, sys.argv is the kernel's own."""
    return f'''\
# The lab's arguments: what you would type after `python labs/{lab}` (e.g. "--preset tiny --steps 2").
# Edit LAB_ARGS here, or set {ARGS_ENV} before starting Jupyter. `--help` lists them all.
import os
import shlex
import sys

LAB_ARGS = os.environ.get("{ARGS_ENV}", "")
sys.argv = ["{lab}", *shlex.split(LAB_ARGS)]
'''


def docstring_markdown(doc: str) -> str:
    """The lab's docstring as markdown: the first line a title, indented lines fenced as shell code."""
    title, _, rest = doc.strip().partition("\n")
    out = [f"# {_escape(title)}", ""]
    block: list[str] = []
    for line in rest.strip("\n").splitlines():
        if line.startswith("    ") and (block or not out[-1].strip()):
            block.append(line[4:])
            continue
        if block:
            out += ["```bash", *block, "```"]
            block = []
        out.append(_escape(line))
    if block:
        out += ["```bash", *block, "```"]
    return "\n".join(out).rstrip()


def _escape(line: str) -> str:
    """Prose as literal markdown text: `*`, `<`, `\\` and a leading `#` escaped outside `code` spans."""
    parts = line.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = re.sub(r"([*<\\])", r"\\\1", parts[i])
    text = "`".join(parts)
    return re.sub(r"^(\s*)#", r"\1\\#", text)


def _sources_digest(cells: list) -> str:
    """sha256 of the cells' types and sources: a notebook someone edited no longer matches."""
    # a notebook file stores a source as a list of lines, a new cell as one string
    data = json.dumps([[c["cell_type"], "".join(c["source"])] for c in cells])
    return hashlib.sha256(data.encode()).hexdigest()


def notebook_for(lab: Path, source: str) -> tuple[dict, int, int]:
    """The notebook for one lab script; also its number of code cells and of indented markers."""
    if jupytext is None:
        raise ConfigError('`journey notebooks` needs the notebooks extra: pip install -e ".[notebooks]"')
    text = lab.read_text()
    lines = text.splitlines()
    inner = sum(bool(_INDENTED_MARKER.match(line)) for line in lines)
    titles: list[str] = []
    masked = []
    for line in lines:
        if titled := _TITLED_MARKER.match(line):
            masked.append(f"# %% journey_title={len(titles)}")
            titles.append(titled.group(1))
        else:
            masked.append(_INDENTED_MARKER.sub(lambda m: m.group(1) + _MASK, line))
    parsed = jupytext.reads("\n".join(masked) + "\n", fmt="py:percent")
    doc = ast.get_docstring(ast.parse(text), clean=True)

    nb = nbformat.v4.new_notebook()
    cells = []
    if doc:
        cells.append(nbformat.v4.new_markdown_cell(
            docstring_markdown(doc) + f"\n\n*Generated from `labs/{lab.name}` by `{GENERATOR}`: edit the "
            "script, then regenerate.*"))
    cells.append(nbformat.v4.new_code_cell(colab_install_cell(source)))
    cells.append(nbformat.v4.new_code_cell(arguments_cell(lab.name)))
    code_cells = 0
    for i, cell in enumerate(parsed.cells):
        body = cell.source.replace(_MASK, "# %%")
        if i == 0 and doc:  # jupytext's first cell holds the docstring (and any code before a marker)
            docstring_end = ast.parse(body).body[0].end_lineno
            body = "\n".join(body.splitlines()[docstring_end:]).strip("\n")
        if not body.strip():
            continue
        if cell.cell_type != "code":
            cells.append(nbformat.v4.new_markdown_cell(body))
            continue
        if "journey_title" in cell.metadata:
            title = titles[cell.metadata["journey_title"]]
        else:  # an untitled marker, or one jupytext read options from (`# %% [markdown]`, ...)
            title = cell.metadata.get("title")
        if title:
            cells.append(nbformat.v4.new_markdown_cell(f"## {_escape(title)}"))
        cells.append(nbformat.v4.new_code_cell(body))
        code_cells += 1
    for k, cell in enumerate(cells):  # stable ids, so regenerating writes the same bytes
        cell["id"] = f"{lab.stem[:50]}-{k:02d}"
    nb.cells = cells
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "journey_dist": {"generator": GENERATOR, "lab": f"labs/{lab.name}",
                         "cells_sha256": _sources_digest(cells)},
    }
    return nb, code_cells, inner


def _check_ours(path: Path) -> None:
    """Raise unless `path` is a notebook this command wrote and nobody edited since."""
    try:
        existing = json.loads(path.read_text())
        marker = existing["metadata"]["journey_dist"]
    except (OSError, ValueError, KeyError, TypeError):
        marker = None
    if not isinstance(marker, dict) or marker.get("generator") != GENERATOR:
        raise ConfigError(f"{path} exists and was not written by `{GENERATOR}`; it is left as it is: "
                          "pass --out with a new or empty directory, or move that file")
    if marker.get("cells_sha256") != _sources_digest(existing.get("cells", [])):
        raise ConfigError(f"{path} was edited after `{GENERATOR}` wrote it; it is left as it is: save your "
                          "copy under another name (or pass --out with another directory) and run again")


def write_notebooks(labs: list[Path], out_dir: Path, source: str | None = None) -> list[Written]:
    """Write `<out_dir>/<lab>.ipynb` for each lab; never replace a file this command did not write.

    `source` is the Colab cell's default pip source (None: `default_source()`). Every target is
    checked before anything is written, so a refusal leaves the directory as it was."""
    source = default_source() if source is None else source
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a directory (it is created if missing)")
    plans = []
    for lab in labs:
        nb, code_cells, inner = notebook_for(lab, source)
        path = out_dir / f"{lab.stem}.ipynb"
        if path.exists() or path.is_symlink():
            _check_ours(path)
        plans.append((lab, path, nbformat.writes(nb) + "\n", code_cells, inner))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for lab, path, text, code_cells, inner in plans:
        changed = not path.exists() or path.read_text() != text
        if changed:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        written.append(Written(lab, path, changed, code_cells, inner))
    return written
