"""The house rules DESIGN.md states, checked: imports flow one way, every `# %%` cell of a lab is at
top level, and a function-level import says why it is deferred.

Layers, bottom to top (a module may import its own layer and the ones below, never above):
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "journey_dist"

LAYERS = [  # bottom first; a module is named by its first component under journey_dist/ (or in SPLIT)
    {"config"},
    {"fault_tolerance", "numerics", "scaling", "compression", "dcp_safe"},
    {"runtime", "mesh", "data", "comm", "tokenizer", "report", "plots", "cluster"},  # the base
    {"moe", "positions", "desync"},
    {"model", "hf_interop", "ngram", "recompute"},
    {"train"},
    {"parity", "extrapolation"},
    {"parallel", "memory.sizes"},  # memory/sizes.py: per-rank shape counts (compose, estimator)
    {"lora", "memory", "serving", "kv_cache", "checkpoint", "resumable", "vocab_growth", "flops"},
    {"plan", "notebooks", "labkit"},
    {"steptime"},  # journey plan's time model, on top of the plan's bytes
    {"search", "calibrate"},
    {"cli"},
]
SPLIT = {"memory.sizes"}  # modules placed apart from their package's layer
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts != ("__init__",):
            dotted = ".".join(parts)
            out.append((dotted if dotted in SPLIT else parts[0], path))
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("journey_dist."):
            dotted = node.module.removeprefix("journey_dist.")
            found.append((dotted if dotted in SPLIT else dotted.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module == "journey_dist":
            found.extend((alias.name, node.lineno) for alias in node.names)
    return found


def test_every_module_has_a_layer():
    unknown = sorted({name for name, _ in _modules()} - set(LEVEL))
    assert not unknown, f"place {unknown} in a layer of tests/test_layout.py (and DESIGN.md's import flow)"


@pytest.mark.parametrize("name,path", _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_module_imports_upward(name, path):
    upward = [(other, line) for other, line in _imports(path) if LEVEL[other] > LEVEL[name]]
    assert not upward, f"{path.relative_to(ROOT)} (layer {LEVEL[name]}) imports upward: {upward}"


def test_function_level_imports_say_why():
    """No hidden dependency graph: an import inside a function breaks a cycle or defers a heavy or
    optional dependency, and a comment next to the function's imports ('deferred: ...' or
    '... cycle ...', on them or the line above the first) says which."""
    unexplained = []
    for _, path in _modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            imports = [s.lineno for s in ast.walk(node) if isinstance(s, (ast.Import, ast.ImportFrom))]
            if not imports:
                continue
            near = " ".join(lines[min(imports) - 2:max(imports)])
            if "deferred" not in near and "cycle" not in near:
                unexplained += [f"{path.relative_to(ROOT)}:{n}" for n in imports]
    assert not unexplained, f"function-level imports without a reason: {unexplained}"


@pytest.mark.parametrize("lab", sorted((ROOT / "labs").glob("*.py")), ids=lambda p: p.stem)
def test_lab_cells_are_at_top_level(lab):
    indented = [i + 1 for i, line in enumerate(lab.read_text().splitlines())
                if line.lstrip().startswith("# %%") and line[:1].isspace()]
    assert not indented, f"{lab.name}: '# %%' inside a block at lines {indented} (no cell can start there)"
