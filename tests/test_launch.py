"""launch/: scripts parse, configs load, the README table covers every lab and setting, and the
accelerate CPU finding the config relies on still holds (slow)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from journey_dist.runtime import find_free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
LABS = sorted(lab.name[:2] for lab in (ROOT / "labs").glob("[0-9][0-9]_*.py"))  # every lab, as labs/ has them
COLUMNS = ["1 CPU", "2 CPU ranks", "1 GPU", "8 GPUs (one machine)", "2 nodes"]


@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh", "slurm.sbatch"])
def test_shell_scripts_parse(script):
    bash = shutil.which("bash")
    assert bash, "bash not found"
    subprocess.run([bash, "-n", str(LAUNCH / script)], check=True)


def test_multi_node_script_names_missing_settings():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(LAUNCH / "torchrun_multi_node.sh"), "labs/02_data_parallel.py"],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode != 0 and "set NNODES" in proc.stderr


def test_scripts_use_c10d_and_the_restart_workaround():
    multi = (LAUNCH / "torchrun_multi_node.sh").read_text()
    assert "--rdzv_backend=c10d" in multi and '--rdzv_endpoint="$MASTER_ADDR:$PORT"' in multi
    for script in ("torchrun_single_node.sh", "torchrun_multi_node.sh"):
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in (LAUNCH / script).read_text()
    sbatch = (LAUNCH / "slurm.sbatch").read_text()
    assert "srun" in sbatch and "torch.distributed.run" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch


@pytest.mark.parametrize("path", sorted((ROOT / "launch/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["num_processes"] >= cfg["num_machines"] >= 1
    assert cfg["distributed_type"] in ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP")


def test_hostfile_lines():
    lines = [ln for ln in (LAUNCH / "deepspeed/hostfile.example").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"\S+ slots=\d+", ln) for ln in lines)


def test_readme_table_has_every_lab_and_setting():
    text = (LAUNCH / "README.md").read_text()
    header = next(ln for ln in text.splitlines() if ln.startswith("| lab |"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == COLUMNS
    rows = {ln.split("|")[1].strip()[:2]: ln for ln in text.splitlines() if re.match(r"\| \d\d ", ln)}
    assert sorted(rows) == LABS
    for lab, row in rows.items():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 1 + len(COLUMNS) and all(cells), f"lab {lab}: {cells}"


@pytest.mark.slow
def test_accelerate_two_cpu_processes_need_accelerate_use_cpu(tmp_path):
    """The finding cpu_2proc.yaml documents: without ACCELERATE_USE_CPU=1 each process thinks it is
    alone; with it, 2 processes on MULTI_CPU."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    probe = tmp_path / "probe.py"
    probe.write_text("import os, sys\nfrom accelerate import Accelerator\na = Accelerator()\n"
                     "open(os.path.join(sys.argv[1], f'probe{os.getpid()}'), 'w').write("
                     "f'PROBE {a.process_index} {a.num_processes} {a.distributed_type}')\n")
    seen = {}
    for use_cpu in ("", "1"):
        out = tmp_path / f"out{use_cpu}"
        out.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("ACCELERATE_USE_CPU", None)
        if use_cpu:
            env["ACCELERATE_USE_CPU"] = use_cpu
        config = str(LAUNCH / "accelerate/cpu_2proc.yaml")
        proc = subprocess.run([accelerate, "launch", "--config_file", config,
                               "--main_process_port", str(find_free_port()), str(probe), str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[use_cpu] = sorted(f.read_text() for f in out.iterdir())
    assert seen[""] == ["PROBE 0 1 DistributedType.NO"] * 2, seen
    assert seen["1"] == ["PROBE 0 2 DistributedType.MULTI_CPU", "PROBE 1 2 DistributedType.MULTI_CPU"], seen
