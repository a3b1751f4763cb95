"""Tensor-parallel parity as lab 03 prints it, saved with the machine it came from.

    python benchmarks/tp_parity.py                 # runs labs/03_tensor_parallel.py (2 gloo ranks)
    python benchmarks/tp_parity.py --steps 3       # any further flags go to the lab

Lab 03 compares tensor parallel (ours, ours + sequence parallel, DTensor) with one process,
fp32: max |loss diff|, first-step gradients, parameters after the AdamW steps, and the rounding
floor (one process, the same batch in 2 micro-batches). These are float rounding, so their
leading digit depends on the CPU's kernels and the threads per rank: notes/parallelism.md quotes
them from this file, which records where they were measured.
Writes benchmarks/results/tp_parity.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAB = "03_tensor_parallel"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_lab(lab_args: list[str]) -> dict:
    """Run lab 03 with its results in a temporary runs directory; return its result.json."""
    with tempfile.TemporaryDirectory() as runs:
        env = dict(os.environ, JOURNEY_RUNS_DIR=runs, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, str(ROOT / "labs" / f"{LAB}.py"), *lab_args], env=env,
                       check=True, cwd=ROOT)
        return json.loads((Path(runs) / LAB / "result.json").read_text())


def summarize(result: dict, lab_args: list[str]) -> dict:
    keys = ("loss_diff", "grad_diff", "param_diff")
    return {
        "meta": {"command": " ".join(["python benchmarks/tp_parity.py", *lab_args]), "tp": result["tp"],
                 "preset": result["preset"], "steps": result["train"]["steps"],
                 "batch": result["train"]["batch_size"], "torch": torch.__version__,
                 "cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]},
        "rounding_floor_param_diff": result["rounding_floor_param_diff"],
        "variants": {name: {k: row[k] for k in keys} for name, row in result["variants"].items()},
    }


def markdown(s: dict) -> str:
    m = s["meta"]
    lines = [f"# Tensor-parallel parity (lab 03, tp={m['tp']}, gloo, fp32)", "",
             f"Command: `{m['command']}`", "",
             f"{m['preset']}, global batch {m['batch']}, {m['steps']} AdamW steps, torch {m['torch']}; "
             f"CPU: {m['cpu']} ({m['cpus']} cores, 1-minute load {m['load_average_1min']:.1f}).", "",
             "| variant | max abs loss diff | first-step grads | params after the steps |",
             "|---|---:|---:|---:|"]
    for name, v in s["variants"].items():
        lines.append(f"| {name} | {v['loss_diff']:.1e} | {v['grad_diff']:.1e} | {v['param_diff']:.1e} |")
    lines += ["", f"Rounding floor (one process, the batch in 2 micro-batches): max |param diff| "
              f"{s['rounding_floor_param_diff']:.1e}.", "",
              "Float rounding only: on another CPU (other vector kernels, other threads per rank) the "
              "digits differ; notes/parallelism.md sets one other machine's figures beside these.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    summary = summarize(run_lab(argv), argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tp_parity.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / "tp_parity.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
