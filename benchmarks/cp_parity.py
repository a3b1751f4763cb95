"""Context-parallel parity, traffic, balance and memory as lab 11 prints them, for cp = 2 and 4 on
gpt-mini and llama-mini, saved with the machine they came from.

    python benchmarks/cp_parity.py                      # 4 runs of labs/11_context_parallel.py
    python benchmarks/cp_parity.py --seq 512 --steps 3  # the defaults

Each run trains fresh models split over cp gloo ranks by ring attention, zigzag and Ulysses next
to one process (fp32, sequences of --seq tokens: 4x gpt-mini's 128) and records: max |diff| of
every step's loss, the first batch's logits and every first-step gradient (the 1e-5 bar),
parameters after the AdamW steps with the one-process rounding floor; the CommLedger of one step
against the formula; causal attention work per rank (FLOPs counted, time measured); activation
memory per rank measured vs estimated. notes/context_parallel.md quotes them from this file.
Writes benchmarks/results/cp_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAB = "11_context_parallel"
sys.path.insert(0, str(ROOT / "benchmarks"))
from tp_parity import cpu_model  # noqa: E402 (the sibling script: one way to name the CPU)


def run_lab(cp: int, preset: str, seq: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as runs:
        env = {**os.environ, "JOURNEY_RUNS_DIR": runs, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, str(ROOT / "labs" / f"{LAB}.py"), "--ranks", str(cp), "--preset", preset,
               "--seq", str(seq), "--steps", str(steps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.loads((Path(runs) / LAB / "result.json").read_text())


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cp_parity.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["meta"]
    lines = ["# Context parallel: parity with one process, traffic, balance, memory (lab 11)", "",
             f"Command: `{m['command']}`", "",
             f"fp32, {m['seq']} tokens per sequence, {m['steps']} AdamW steps, torch {m['torch']}, "
             f"{m['cpu']}, load average {m['load_average_1min']:.1f}. Worst over all ranks vs one process.",
             "",
             "| model | cp | design | max\\|loss\\| | max\\|logits\\| | max\\|grad\\| | max\\|param\\| "
             "(floor) | ledger = formula | activations/rank measured = estimated |",
             "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for key, r in result["runs"].items():
        preset, cp = key.rsplit(" cp", 1)
        for design, d in r["parity"]["diffs"].items():
            mem = r["memory"]["per_design"][design]
            lines.append(f"| {preset} | {cp} | {design} | {d['loss']:.1e} | {d['logits']:.1e} | "
                         f"{d['grad']:.1e} | {d['param']:.1e} "
                         f"({r['parity']['rounding_floor_param_diff']:.1e}) | "
                         f"{'yes' if r['traffic']['match'] else 'NO'} | "
                         f"{'yes' if mem['activations'] == mem['estimated_activations'] else 'NO'} |")
    lines += ["", "Causal attention work per rank (forward, gpt-mini): max/mean of FLOPs (counted) and time "
              "(measured, one rank at a time, one thread):", ""]
    for key, r in result["runs"].items():
        if key.startswith("gpt-mini"):
            for kind, v in r["balance"]["imbalance"].items():
                lines.append(f"- {key}, {kind}: FLOPs {v['flops']:.2f}, time {v['seconds']:.2f}")
    (RESULTS / "cp_parity.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    runs = {f"{preset} cp{cp}": run_lab(cp, preset, a.seq, a.steps)
            for preset in ("gpt-mini", "llama-mini") for cp in (2, 4)}
    meta = {"command": "python benchmarks/cp_parity.py " + " ".join(sys.argv[1:]), "seq": a.seq,
            "steps": a.steps, "torch": torch.__version__, "cpu": cpu_model(), "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0]}
    write({"meta": meta, "runs": runs})
    print((RESULTS / "cp_parity.md").read_text())
