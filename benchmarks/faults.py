"""How long a fault takes to end a 2-rank job, and whether the job's last lines name the culprit.

    python benchmarks/faults.py                              # every case, this checkout
    python benchmarks/faults.py --repo /tmp/old --label before --cases sigstop_torchrun

Each case runs `labs/02_data_parallel.py --preset tiny` on 2 ranks (plain python: runtime.spawn;
or torchrun), waits until the ranks are inside the data-parallel variants (the table header is
printed; every step all-reduces from then on), injects one fault, and times from the fault to
the end of the job:
  sigstop_torchrun / sigstop_spawn   rank 1 frozen with SIGSTOP (a hung node: no exit, no RST)
  kill_rank_torchrun                 rank 1 killed with SIGKILL
  kill_launcher_spawn                the plain-python launcher killed with SIGKILL: seconds until
                                     no rank process is left (capped at --cap; orphans are then
                                     killed by this script), and whether orphans finished the run
                                     and wrote its result
  ctrl_c_spawn                       SIGINT to the launcher's process group (Ctrl-C in a shell)
Environment variables (JOURNEY_HANG_TIMEOUT, JOURNEY_TIMEOUT) pass through unchanged, so the
defaults are measured unless you set them. --repo runs another checkout (e.g. `git archive` of an
older commit) with this same script; --note says what it is. The load average is recorded: the
box may be shared.
Writes benchmarks/results/faults_<label>.{json,md} (--render-only: the .md again from the .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

CASES = ("sigstop_torchrun", "sigstop_spawn", "kill_rank_torchrun", "kill_launcher_spawn", "ctrl_c_spawn")
LAB = ["labs/02_data_parallel.py", "--preset", "tiny", "--steps", "60"]
READY = "max|loss-ref|"  # lab 02's variant table header: the ranks are about to all-reduce every step

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                    help="checkout whose labs/ and journey_dist/ are run (default: this one)")
parser.add_argument("--label", default="after", help="results file suffix")
parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
parser.add_argument("--cap", type=float, default=300.0, help="seconds after the fault before giving up")
parser.add_argument("--tail", type=int, default=6, help="lines of the job's output kept per case")
parser.add_argument("--note", default="", help="what --repo is, for the results file")
parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the --label's .json")
args = parser.parse_args()
if unknown := set(args.cases.split(",")) - set(CASES):
    parser.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")


class Job:
    """The lab in a subprocess (own session), its output collected by a reader thread."""

    def __init__(self, torchrun: bool, runs_dir: str):
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else []
        cmd = [sys.executable, *launcher, *LAB]
        env = {**os.environ, "PYTHONPATH": args.repo, "JOURNEY_RUNS_DIR": runs_dir, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=args.repo, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if READY in line:
                self.ready.set()
        self.ready.set()  # ended before the table: the case reports it

    def ranks(self) -> list[psutil.Process]:
        """The two rank processes in rank order (torchrun: by RANK; spawn: by start order)."""
        kids = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
        if any("torch.distributed.run" in a for a in psutil.Process(self.proc.pid).cmdline()):
            return sorted(kids, key=lambda p: int(p.environ().get("RANK", 99)))[:2]
        return sorted(kids, key=lambda p: (p.create_time(), p.pid))[:2]


def gone(p: psutil.Process) -> bool:
    """Exited (a zombie too: its parent, the killed launcher, is not there to reap it)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run_case(case: str, runs_dir: str) -> dict:
    job = Job("torchrun" in case, runs_dir)
    if not job.ready.wait(600) or job.proc.poll() is not None:
        job.proc.kill()
        return {"case": case, "error": "the lab ended before the fault", "tail": job.lines[-args.tail:]}
    ranks = job.ranks()
    t0 = time.monotonic()
    if case.startswith("sigstop"):
        ranks[1].send_signal(signal.SIGSTOP)
    elif case == "kill_rank_torchrun":
        ranks[1].send_signal(signal.SIGKILL)
    elif case == "ctrl_c_spawn":
        os.killpg(job.proc.pid, signal.SIGINT)
    elif case == "kill_launcher_spawn":
        job.proc.send_signal(signal.SIGKILL)
    row: dict = {"case": case}
    if case == "kill_launcher_spawn":
        job.proc.wait()
        while not all(gone(p) for p in ranks) and time.monotonic() - t0 < args.cap:
            time.sleep(0.02)
        alive = [p for p in ranks if not gone(p)]
        row.update(seconds=time.monotonic() - t0, orphans_left=len(alive),
                   orphans_wrote_result=(Path(runs_dir) / "02_data_parallel" / "result.json").exists())
        for p in alive:  # this script started them (as grandchildren): clean up
            p.kill()
    else:
        try:
            job.proc.wait(timeout=args.cap)
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()
            row["gave_up"] = True
        row.update(seconds=time.monotonic() - t0, exit_code=job.proc.returncode)
    for p in ranks:  # a frozen rank left behind (the launcher died without reaping it)
        if not gone(p):
            p.kill()
    time.sleep(0.2)  # the reader thread drains the pipe
    tail = [line for line in job.lines if line.strip()][-args.tail:]
    row["tail"] = tail
    row["names_rank_1"] = bool(re.search(r"rank\s*:?\s*1\b", "\n".join(tail)))
    print(f"{case:<20} {row['seconds']:7.1f} s  exit {row.get('exit_code', '-')}  "
          f"rank 1 named in the last lines: {row['names_rank_1']}\n    " + "\n    ".join(tail), flush=True)
    return row


def write_markdown(result: dict, out: Path) -> None:
    lines = [f"# Faults in a 2-rank job ({result['label']})", "", f"Command: `{result['command']}`", "",
             *([result["note"], ""] if result.get("note") else []),
             f"`{' '.join(result['lab'])}` on 2 ranks, {result['cores']} cores, load average at the end "
             f"{result['load_average'][0]:.1f}; environment: {result['env'] or 'defaults'}. Seconds from the "
             "fault to the end of the job (kill_launcher_spawn: until no rank process is left).", "",
             "| case | seconds | exit | rank 1 in the last lines | last line that is not a border |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        text = [line.strip() for line in r.get("tail", []) if line.strip().strip("=-")]
        last = (text or [""])[-1].replace("|", "/")[:140]
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        if r.get("orphans_left"):
            seconds = f"> {seconds} ({r['orphans_left']} orphan(s) left)"
        if r.get("orphans_wrote_result"):
            seconds += " (the orphans trained to the end and wrote the result)"
        lines.append(f"| {r['case']} | {seconds} | {r.get('exit_code', '-')} | "
                     f"{'yes' if r.get('names_rank_1') else 'no'} | `{last}` |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


out = Path(__file__).parent / "results" / f"faults_{args.label}"
if args.render_only:
    write_markdown(json.loads(out.with_suffix(".json").read_text()), out)
    raise SystemExit(f"wrote {out}.md from {out}.json")
rows = []
scratch = Path(tempfile.mkdtemp(prefix="journey-faults-"))  # the lab's runs/, one per case
try:
    for case in args.cases.split(","):
        rows.append(run_case(case, str(scratch / case)))
finally:
    shutil.rmtree(scratch, ignore_errors=True)

command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/faults.py", *sys.argv[1:]])
env_used = {k: os.environ[k] for k in ("JOURNEY_HANG_TIMEOUT", "JOURNEY_TIMEOUT") if k in os.environ}
result = {"command": command, "label": args.label, "note": args.note, "lab": LAB, "env": env_used,
          "python": sys.version.split()[0], "cpu": platform.processor() or platform.machine(),
          "cores": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows}
out.parent.mkdir(exist_ok=True)
out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
write_markdown(result, out)
print(f"wrote {out}.json and .md")
