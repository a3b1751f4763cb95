"""Wrong configs and arguments fail before training with a ConfigError naming problem and fix.

Each row: (what is wrong, a call that must raise, a regex for the problem, a regex for the fix).
Nothing here starts a process group: these checks run before any rank exists. The lab rows run a
lab as a learner does and check what the learner sees: exit status 2, one `error:` line naming
the problem and the fix (in flags the lab has), no traceback, and no rank started.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from journey_dist import labkit
from journey_dist.cli import main as journey
from journey_dist.cluster import get_cluster, load_cluster
from journey_dist.config import ConfigError, GPTConfig, ParallelConfig, check_bucket_mb, get_preset
from journey_dist.data import ByteTokenizer, TokenData, check_fits, load_text, load_tokens
from journey_dist.model import GPT
from journey_dist.parallel.context.accounting import check_context_parallel
from journey_dist.parallel.pipeline.orders import bubble_formula
from journey_dist.parallel.pipeline.split_backward import BackwardSplit
from journey_dist.parallel.sharding.deepspeed import choose_stages, load_config
from journey_dist.search import dp_for, search_layouts
from journey_dist.steptime import predict_step
from journey_dist.train import StepHooks, TrainConfig, train

MINI = get_preset("gpt-mini")  # 4 layers, 4 heads, vocab 256, block 128
ROOT = Path(__file__).resolve().parents[1]


def _text_file(tmp_path: Path, data: bytes, name: str = "text.txt") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _thesis(tmp_path: Path) -> Path:
    """A directory holding someone's work: a file and a sub-folder."""
    work = tmp_path / "thesis"
    (work / "figures").mkdir(parents=True)
    (work / "thesis.txt").write_text("three years of work\n")
    (work / "figures" / "plot.txt").write_text("data\n")
    return work


def _tokens(n: int) -> TokenData:
    ids = torch.arange(n) % 256
    n_val = n // 10
    return TokenData(ids[: n - n_val], ids[n - n_val:], ByteTokenizer())


class _OwnWeight(torch.nn.Module):
    """A module using a weight of its own and a Linear: W per module cannot split it."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4))
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x) * self.scale


LAB_FLAGS = {"data": "--data", "batch_size": "--batch-size"}  # how a lab spells the fix
CASES = {
    "world size mismatch": (
        lambda tmp: ParallelConfig(dp=2, tp=2).validate(MINI, world_size=2),
        r"dp\*tp\*pp = 2\*2\*1 = 4 but the world has 2 ranks", r"--nproc_per_node=4"),
    "tp does not divide heads": (
        lambda tmp: ParallelConfig(tp=3).validate(MINI, world_size=3),
        r"tp=3 does not divide n_head=4", r"use a tp in \[1, 2, 4\]"),
    "tp does not divide vocab": (
        lambda tmp: ParallelConfig(tp=3).validate(MINI.with_(n_head=3, n_embd=96), world_size=3),
        r"tp=3 does not divide vocab_size=256", r"pad the vocabulary to 258"),
    "pp larger than layers": (
        lambda tmp: ParallelConfig(pp=8, microbatches=8).validate(MINI, world_size=8),
        r"pp=8 is larger than n_layer=4", r"use pp <= 4"),
    "dp does not divide batch": (
        lambda tmp: ParallelConfig(dp=2).validate(MINI, world_size=2, global_batch=7),
        r"global batch 7 is not divisible by dp\*microbatches = 2\*1", r"multiple of 2"),
    "too few microbatches for 1F1B": (
        lambda tmp: ParallelConfig(pp=4, microbatches=2).validate(MINI, world_size=4),
        r"microbatches=2 < pp=4", r"microbatches >= 4"),
    "interleaved with layers not divisible by pp*v": (
        lambda tmp: ParallelConfig(pp=2, microbatches=4, schedule="interleaved", virtual_stages=3).validate(
            MINI, world_size=2),
        r"n_layer=4 is not divisible by pp\*virtual_stages = 2\*3 = 6", r"use virtual_stages in \[2\]"),
    "interleaved with microbatches not a multiple of pp": (
        lambda tmp: ParallelConfig(pp=2, microbatches=5, schedule="interleaved", virtual_stages=2).validate(),
        r"microbatches=5 is not a multiple of pp=2", r"use microbatches=6"),
    "interleaved with one chunk per rank": (
        lambda tmp: ParallelConfig(pp=2, microbatches=4, schedule="interleaved").validate(),
        r"'interleaved' needs virtual_stages >= 2", r"use virtual_stages=2 or schedule='1f1b'"),
    "virtual stages without the interleaved schedule": (
        lambda tmp: ParallelConfig(pp=2, microbatches=4, virtual_stages=2).validate(),
        r"virtual_stages=2 needs schedule='interleaved' \(got '1f1b'\)", r"use virtual_stages=1"),
    "too few microbatches for ZB-H1": (
        lambda tmp: ParallelConfig(pp=4, microbatches=3, schedule="zb-h1").validate(MINI, world_size=4),
        r"microbatches=3 < pp=4: ZB-H1 needs", r"microbatches >= 4"),
    "ZB-H1 with tensor parallel": (
        lambda tmp: ParallelConfig(pp=2, tp=2, microbatches=4, schedule="zb-h1").validate(MINI, world_size=4),
        r"schedule='zb-h1' with tp=2, cp=1 is not supported", r"use schedule='1f1b'"),
    "ZB-H1 on a stage whose weights are not in leaf modules": (
        lambda tmp: BackwardSplit(torch.nn.Sequential(_OwnWeight())),
        r"_OwnWeight uses parameters of its own and has submodules with parameters",
        r"use schedule='1f1b' for this stage"),
    "ZB-H1 bubble expression outside its assumption": (
        lambda tmp: bubble_formula("zb-h1", 4, 8, t_f=1, t_b=1, t_w=2),
        r"assumes t_w <= t_b \(got t_w=2, t_b=1\)", r"use simulate\(\) for these times"),
    "ZeRO without data parallel": (
        lambda tmp: ParallelConfig(zero=2).validate(MINI, world_size=1),
        r"zero=2 shards over data-parallel ranks", r"use dp >= 2 or zero=0"),
    "heads do not divide width": (
        lambda tmp: GPTConfig(n_embd=100, n_head=3),
        r"n_embd=100 is not divisible by n_head=3", r"multiple of n_head"),
    "kv heads do not divide query heads": (
        lambda tmp: GPTConfig(n_head=6, n_embd=192, n_kv_head=4),
        r"n_head=6 is not divisible by n_kv_head=4", r"use n_kv_head in \[1, 2, 3, 6\]"),
    "rope with an odd head dim": (
        lambda tmp: get_preset("llama-mini", n_embd=132),
        r"head_dim = n_embd/n_head = 132/4 = 33 is odd", r"multiple of 2\*n_head \(e.g. 136\)"),
    "tp does not divide kv heads": (
        lambda tmp: ParallelConfig(tp=4).validate(get_preset("llama-mini"), world_size=4),
        r"tp=4 does not divide n_kv_head=2", r"use a tp in \[1, 2\]"),
    "tp does not divide the MLP width": (
        lambda tmp: ParallelConfig(tp=4).validate(MINI.with_(mlp="swiglu", mlp_hidden=350), world_size=4),
        r"tp=4 does not divide the MLP width 350", r"mlp_hidden a multiple of 4"),
    "unknown norm": (
        lambda tmp: GPTConfig(norm="batchnorm"),
        r"norm='batchnorm' is unknown", r"use one of 'layernorm', 'rmsnorm'"),
    "unknown preset": (
        lambda tmp: get_preset("gpt5"),
        r"unknown preset 'gpt5'", r"choose one of: tiny, gpt-mini"),
    "bad bucket size": (
        lambda tmp: check_bucket_mb(-1),
        r"bucket_mb=-1 must be a positive number", r"DDP's default is 25"),
    "missing data file": (
        lambda tmp: load_text(str(tmp / "nope.txt")),
        r"data file '.*nope.txt' not found", r"pass an existing text file or one of .*handbook"),
    "non-UTF-8 text": (
        lambda tmp: load_text(_text_file(tmp, "café au lait\n".encode("latin-1"))),
        r"text.txt is not UTF-8 text \(byte 3: b'\\xe9'\)", r"iconv -f latin1 -t utf-8"),
    "empty data file": (
        lambda tmp: load_text(_text_file(tmp, b"")),
        r"data file .*text.txt is empty", r"pass a text file with at least"),
    "block_size larger than the corpus": (
        lambda tmp: check_fits(_tokens(100), batch_size=1, block_size=128),
        r"training text has 90 tokens but a sample needs block_size\+1 = 129", r"smaller block_size"),
    "validation split too short": (
        lambda tmp: check_fits(_tokens(1000), batch_size=1, block_size=128),
        r"validation text has 100 tokens", r"use a longer text"),
    "batch larger than the corpus": (
        lambda tmp: check_fits(_tokens(5000), batch_size=64, block_size=128),
        r"one batch of 64 x 128 = 8,192 tokens is larger than the training text \(4,500 tokens\)",
        r"use batch_size <= 35"),
    "zero global batch": (
        lambda tmp: ParallelConfig(tp=2).validate(MINI, world_size=2, global_batch=0),
        r"global batch 0 must be a positive integer", r"use a multiple of dp\*microbatches = 1"),
    "zero training steps": (
        lambda tmp: TrainConfig(steps=0),
        r"TrainConfig.steps=0 must be a positive integer", r"use steps >= 1"),
    "missing DeepSpeed config": (
        lambda tmp: load_config(tmp / "nope.json", TrainConfig(), 2),
        r"DeepSpeed config '.*nope.json' not found", r"pass one of launch/deepspeed/zero1.json"),
    "DeepSpeed config without a ZeRO stage": (
        lambda tmp: load_config(_text_file(tmp, b'{"zero_optimization": {}}', "ds.json"), TrainConfig(), 2),
        r"zero_optimization.stage must be 1, 2 or 3", r'set "zero_optimization": \{"stage": 2\}'),
    "non-positive batch": (
        lambda tmp: check_fits(_tokens(5000), batch_size=0, block_size=8),
        r"batch_size=0 must be a positive integer", r"use batch_size >= 1"),
    "data path is a directory": (  # was reported as "not found"
        lambda tmp: load_text(str(tmp)),
        r"data path '.*' is a directory", r"pass a UTF-8 text file or one of the embedded corpora"),
    "9-byte text, fix in the lab's flags": (  # named block_size, which the labs have no flag for
        lambda tmp: check_fits(_tokens(9), 16, 128, flags=LAB_FLAGS),
        r"training text has 9 tokens but a sample needs block_size\+1 = 129",
        r"pass --data a longer text \(at least 1,300 tokens"),
    "batch larger than the corpus, fix in the lab's flags": (
        lambda tmp: check_fits(_tokens(5000), 64, 128, flags=LAB_FLAGS),
        r"one batch of 64 x 128", r"use --batch-size <= 35 or pass --data a longer text"),
    "results root is a file": (
        lambda tmp: labkit.check_writable_dir(Path(_text_file(tmp, b"x", "runs")) / "02_data_parallel",
                                              "pass --out DIR"),
        r"cannot write results to .*runs/02_data_parallel: .*runs is a file, not a directory",
        r"move it away, or pass --out DIR"),
    "someone's directory as the lab's --dir": (
        lambda tmp: labkit.claim_dir(_thesis(tmp), "10_reliability", "--dir"),
        r"--dir .*thesis already holds files this lab did not create \(figures, thesis.txt\)",
        r"pass a new one, e.g. --dir .*thesis/10_reliability"),
    "a file as the lab's --dir": (
        lambda tmp: labkit.claim_dir(_text_file(tmp, b"x", "ckpt"), "10_reliability", "--dir"),
        r"ckpt is a file, not a directory", r"pass --dir with a new directory, e.g. --dir .*/10_reliability"),
    "not a device": (
        lambda tmp: labkit.resolve_device("gpu"),
        r"--device 'gpu' is not a device", r"use cpu or cuda"),
    "DeepSpeed stages asked for, DeepSpeed not installed": (
        lambda tmp: choose_stages([2], None, False, available=False),
        r"DeepSpeed is not installed, so --stages/--ds-config cannot run",
        r'pip install -e "\.\[deepspeed\]", or pass --skip-deepspeed'),
    "--skip-deepspeed with --ds-config": (  # --ds-config was silently ignored
        lambda tmp: choose_stages(None, "launch/deepspeed/zero2.json", True),
        r"--skip-deepspeed leaves out the DeepSpeed stages", r"pass one or the other"),
    "ep does not divide the number of experts": (
        lambda tmp: ParallelConfig(dp=6, ep=3).validate(get_preset("moe-mini"), world_size=6),
        r"ep=3 does not divide n_experts=8", r"use an ep in \[1, 2, 4, 8\]"),
    "ep does not divide dp": (
        lambda tmp: ParallelConfig(dp=4, ep=3).validate(get_preset("moe-mini"), world_size=4),
        r"ep=3 does not divide dp=4", r"use an ep in \[1, 2, 4\] or dp a multiple of 3"),
    "top-k greater than the experts": (
        lambda tmp: get_preset("moe-mini", moe_top_k=9),
        r"moe_top_k=9: each token picks top-k of n_experts=8", r"use 1 <= moe_top_k <= 8"),
    "capacity factor <= 0": (
        lambda tmp: get_preset("moe-mini", moe_capacity_factor=0.0),
        r"moe_capacity_factor=0.0 must be > 0", r"or None \(no token dropped\)"),
    "expert parallel on a dense model": (
        lambda tmp: ParallelConfig(dp=2, ep=2).validate(MINI, world_size=2),
        r"ep=2 splits the experts of a mixture of experts, but this model is dense", r"use ep=1 or an MoE"),
    "an MoE switch without experts": (
        lambda tmp: GPTConfig(moe_top_k=1),
        r"moe_top_k set but n_experts=0", r"set n_experts \(e.g. 8\)"),
    "journey plan: unknown GPU": (
        lambda tmp: get_cluster("v100"),
        r"unknown GPU 'v100'", r"use one of a100, h100, h200, cpu-gloo \(or a cluster file"),
    "journey plan: GPUs that do not factor": (
        lambda tmp: dp_for(64, 8, 3),
        r"64 GPUs do not factor as dp x tp x pp with tp=8, pp=3", r"use pp in \[1, 2, 4, 8\]"),
    "journey plan --search: no layout fits": (
        lambda tmp: search_layouts(get_preset("llama3-405b"), get_cluster("h100"), gpus=8, seq=8192, batch=8),
        r"no layout of 8 GPUs fits in 74.51 GiB per GPU .*the smallest peak was",
        r"use more GPUs, a shorter --seq or a smaller batch"),
    "journey plan --search --ep on a dense model": (
        lambda tmp: search_layouts(MINI, get_cluster("h100"), gpus=8, seq=128, batch=8, ep=2),
        r"ep=2 splits the experts of a mixture of experts, but this model is dense",
        r"drop --ep or search an MoE preset"),
    "journey plan --search --ep not dividing the experts": (
        lambda tmp: search_layouts(get_preset("moe-mini"), get_cluster("h100"), gpus=8, seq=128, batch=8,
                                   ep=3),
        r"ep=3 does not divide n_experts=8", r"use an ep in \[1, 2, 4, 8\] \(or drop --ep to search\)"),
    "journey plan: ZeRO with a mixture of experts in the time model": (
        lambda tmp: predict_step(get_preset("moe-mini"), ParallelConfig(dp=2, zero=1), get_cluster("h100"),
                                 batch=8),
        r"zero=1 with a mixture of experts: ZeRO's collectives over dp and edp are not in the time model",
        r"time it with zero=0 \(drop --zero\)"),
    "journey plan --search --cp not dividing the GPUs": (
        lambda tmp: search_layouts(MINI, get_cluster("h100"), gpus=8, seq=128, batch=8, cp=3),
        r"cp=3 must be a positive integer dividing the 8 GPUs", r"use one of \[1, 2, 4, 8\]"),
    "journey plan: cp with ZeRO in the time model": (
        lambda tmp: predict_step(MINI, ParallelConfig(dp=2, cp=2, zero=1), get_cluster("h100"), batch=8),
        r"cp=2 with ZeRO: its collectives over the dp x cp group are not in the time model",
        r"time it with cp=1 or with a dense model and zero=0"),
    "journey plan: a cluster file with an unknown key": (
        lambda tmp: load_cluster(_text_file(tmp, b'base = "h100"\nnvlink_gb_s = 900\n', "c.toml")),
        r"unknown cluster setting 'nvlink_gb_s'", r"use gpus_per_node, peak_tflops, .*intra_gb_s"),
    "cp does not divide the sequence": (
        lambda tmp: check_context_parallel(ParallelConfig(cp=3), MINI, 128),
        r"a sequence of 128 tokens does not split into cp = 3 equal chunks", r"a multiple of 3 \(e.g. 126\)"),
    "zigzag needs 2cp chunks": (
        lambda tmp: check_context_parallel(ParallelConfig(cp=4, cp_design="zigzag"), MINI, 132),
        r"132 tokens does not split into 2\*cp = 8 equal chunks", r"a multiple of 8 \(e.g. 128\)"),
    "Ulysses with cp not dividing the heads": (
        lambda tmp: check_context_parallel(ParallelConfig(cp=3, cp_design="ulysses"), MINI, 129),
        r"cp=3 does not divide the 4 query heads", r"use a cp in \[1, 2, 4\], or the ring design"),
    "cp with a pipeline schedule it is not built for": (
        lambda tmp: check_context_parallel(ParallelConfig(cp=2, pp=2, microbatches=2, schedule="zb-h1"),
                                           MINI, 128),
        r"cp=2 with pp=2: the context-parallel stages are built and tested with the gpipe and 1f1b "
        r"schedules, not 'zb-h1'", r"use schedule='1f1b' \(or gpipe\), or cp=1"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_config_error_naming_problem_and_fix(case, tmp_path):
    call, problem, fix = CASES[case]
    with pytest.raises(ConfigError) as info:
        call(tmp_path)
    message = str(info.value)
    assert re.search(problem, message), f"{case}: {message}"
    assert re.search(fix, message), f"{case}: no fix in {message}"


def test_train_checks_the_corpus_before_the_first_step(tmp_path):
    """A tiny text used to fail at the final evaluation, after all the training; now at once."""
    data = load_tokens(_text_file(tmp_path, b"a short text, far shorter than one sample\n" * 5))
    model = GPT(get_preset("tiny"))
    calls = []
    with pytest.raises(ConfigError, match="validation text has"):
        train(model, data, TrainConfig(steps=3, batch_size=2),
              StepHooks(step_fn=lambda *a, **k: calls.append(1)), verbose=False)
    assert not calls


def test_cli_reports_config_errors_without_a_traceback(capsys, tmp_path):
    assert journey(["estimate", "--preset", "gpt5", "--measure", "no"]) == 2
    assert "journey: error: unknown preset 'gpt5'" in capsys.readouterr().err
    assert journey(["checkpoints", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # --seq 0 used to fall back silently to block_size (`args.seq or block_size`) and print an estimate
    assert journey(["estimate", "--preset", "gpt-mini", "--seq", "0", "--measure", "no"]) == 2
    assert "seq_len=0 must be in 1..block_size=128" in capsys.readouterr().err


# ------------------------------------------------------------------ the labs, run as a learner runs them


def _run_lab(tmp_path: Path, lab: str, args: list[str], env: dict[str, str] | None = None,
             timeout_s: float = 180):
    """labs/<lab> with `args` ({thesis}, {nine_bytes}, {a_dir} filled in), from a scratch directory."""
    paths = {"thesis": lambda: _thesis(tmp_path), "nine_bytes": lambda: _text_file(tmp_path, b"x" * 9),
             "a_dir": lambda: tmp_path}
    argv = [str(paths[a[1:-1]]()) if a[1:-1] in paths else a for a in args]
    full_env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JOURNEY_RUNS_DIR": str(tmp_path / "runs"),
                **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "labs" / lab), *argv], capture_output=True, text=True,
                          timeout=timeout_s, cwd=tmp_path, env=full_env)


def _runs_file(tmp_path: Path) -> dict[str, str]:
    return {"JOURNEY_RUNS_DIR": _text_file(tmp_path, b"not a directory\n", "runs")}


slow = pytest.mark.slow
# (lab, arguments, problem, fix, environment); before this change each of these trained anyway,
# crashed in every rank with a traceback, or failed only after the whole run. Arguments in braces
# are paths made per test. The slow-marked rows repeat a mechanism a fast row already covers.
LAB_CASES = [
    pytest.param("03_tensor_parallel.py", ["--tp", "4"], r"unrecognized arguments: --tp 4",
                 r"did you mean --ranks\?", None, id="lab03 unknown --tp"),
    pytest.param("07_memory_profile.py", ["--batch-size", "4"], r"unrecognized arguments: --batch-size 4",
                 r"did you mean --batch\?", None, id="lab07 unknown --batch-size", marks=slow),
    pytest.param("02_data_parallel.py", ["--lr", "-1"], r"argument --lr: -1 must be a positive number",
                 r"\(> 0\)", None, id="lab02 --lr -1"),
    pytest.param("02_data_parallel.py", ["--lr", "nan"], r"argument --lr: nan is not a finite number",
                 r"pass a finite value", None, id="lab02 --lr nan", marks=slow),
    pytest.param("04_pipeline_parallel.py", ["--sleep-ms", "-5"],
                 r"argument --sleep-ms: -5 must be a positive", r"\(> 0\)", None, id="lab04 --sleep-ms -5",
                 marks=slow),
    pytest.param("02_data_parallel.py", ["--data", "{nine_bytes}"], r"training text has 9 tokens",
                 r"pass --data a longer text", None, id="lab02 9-byte --data"),
    pytest.param("00_tokens_and_ngrams.py", ["--data", "{nine_bytes}"], r"training text has 9 tokens",
                 r"pass --data a longer text", None, id="lab00 9-byte --data", marks=slow),
    pytest.param("02_data_parallel.py", ["--data", "{a_dir}"], r"data path .* is a directory",
                 r"pass a UTF-8 text file", None, id="lab02 directory as --data", marks=slow),
    pytest.param("08_lora_finetune.py", ["--base", "/nonexistent.pt"], r"--base /nonexistent.pt not found",
                 r"pass the model.pt lab 01 writes .*, or leave --base out to pretrain here", None,
                 id="lab08 missing --base"),
    # batch 512 does not fit any machine this runs on (~3 TB estimated), so the guard is what stops it
    pytest.param("07_memory_profile.py", ["--preset", "gpt2-xl", "--batch", "512"],
                 r"estimated peak .* is more than .* free to use", r"pass --force to measure anyway", None,
                 id="lab07 gpt2-xl does not fit"),
    pytest.param("11_context_parallel.py", ["--ranks", "3", "--seq", "510"],
                 r"cp=3 does not divide the 4 query heads", r"or the ring design", None,
                 id="lab11 Ulysses with cp=3"),
    pytest.param("11_context_parallel.py", ["--seq", "101"], r"101 tokens does not split into cp = 2",
                 r"a multiple of 2", None, id="lab11 odd sequence", marks=slow),
    pytest.param("01_single_device.py", [], r"cannot write results to .*/01_single_device: .*runs is a file",
                 r"pass --out DIR \(or set JOURNEY_RUNS_DIR\)", _runs_file, id="lab01 runs/ is a file",
                 marks=slow),
    pytest.param("12_mixture_of_experts.py", ["--capacity-factor", "0"],
                 r"moe_capacity_factor=0.0 must be > 0", r"or None \(no token dropped\)", None,
                 id="lab12 --capacity-factor 0"),
    pytest.param("12_mixture_of_experts.py", ["--ranks", "6", "--ep", "3"],
                 r"ep=3 does not divide n_experts=8", r"use an ep in \[1, 2, 4, 8\]", None, id="lab12 --ep 3",
                 marks=slow),
    pytest.param("12_mixture_of_experts.py", ["--top-k", "9"], r"moe_top_k=9: each token picks top-k of",
                 r"use 1 <= moe_top_k <= 8", None, id="lab12 --top-k 9", marks=slow),
    # lab 13 parsed with parse_known_args: a misspelt flag was ignored and the whole lab ran
    pytest.param("13_serving.py", ["--request", "4"], r"unrecognized arguments: --request 4",
                 r"did you mean --requests\?", None, id="lab13 unknown --request"),
    pytest.param("13_serving.py", ["--blocks", "1"], r"--blocks 1 x --block 16 holds less than one context "
                 r"window", r"use --blocks >= 8", None, id="lab13 --blocks 1", marks=slow),
]


@pytest.mark.parametrize("lab, args, problem, fix, env", LAB_CASES)
def test_lab_fails_in_setup_with_one_error_line(tmp_path, lab, args, problem, fix, env):
    proc = _run_lab(tmp_path, lab, args, env(tmp_path) if env else None)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"{lab}: error: "), errors
    assert re.search(problem, errors[0]) and re.search(fix, errors[0]), errors[0]
    assert proc.stdout == "", proc.stdout[-2000:]  # nothing ran: no rank, no training, no output


def _tree(root: Path) -> list:
    """Every path under `root` with its bytes (None for a directory)."""
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None)
                  for p in root.rglob("*"))


def test_lab10_leaves_someone_elses_directory_untouched(tmp_path):
    """`--dir X` used to empty X first (`--dir .` would have taken the repository with it)."""
    work = _thesis(tmp_path)
    before = _tree(work)
    proc = _run_lab(tmp_path, "10_reliability.py", ["--dir", str(work)])
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"^10_reliability.py: error: --dir .*thesis already holds files this lab did not "
                     r"create \(figures, thesis.txt\).* pass a new one, e.g. --dir .*thesis/10_reliability$",
                     errors[0])
    assert _tree(work) == before and proc.stdout == ""


def test_lab_deletes_only_what_it_created(tmp_path):
    lab = "10_reliability"
    own = labkit.claim_dir(tmp_path / "ckpt", lab, "--dir")  # new: created, with an owner file
    (own / "file").mkdir()
    (own / "file" / "step_00000005.pt").write_bytes(b"an old run's checkpoint")
    (own / "notes.txt").write_text("the learner's own file\n")
    assert labkit.claim_dir(own, lab, "--dir") == own  # its own directory, not empty: accepted
    labkit.clear_owned(own, lab, ["file", "dcp"])
    assert sorted(p.name for p in own.iterdir()) == [labkit.OWNER_FILE, "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert labkit.claim_dir(empty, lab, "--dir") == empty  # an empty directory is adopted
    with pytest.raises(ConfigError, match="belongs to another lab"):
        labkit.claim_dir(own, "99_other", "--dir")
    with pytest.raises(ConfigError, match="refusing to delete in it"):
        labkit.clear_owned(_thesis(tmp_path), lab, ["thesis.txt"])
    with pytest.raises(ValueError, match="entry names"):
        labkit.clear_owned(own, lab, [".."])
    assert (tmp_path / "thesis" / "thesis.txt").is_file()


def test_memory_guard_is_journey_estimates(monkeypatch):
    """gpt2-xl, batch 8 x 128, fp32 AdamW: ~23.8 GiB estimated; on a machine with 23 GiB available
    `journey estimate` will not measure it, and neither will lab 07 nor a training lab (unless --force)."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=23 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    xl = get_preset("gpt2-xl")
    too_big = r"estimated peak 23.\d+ GiB is more than 5.75 GiB free to use.*--force"
    with pytest.raises(ConfigError, match=too_big):
        labkit.check_memory(False, xl, 8, 128)
    labkit.check_memory(True, xl, 8, 128)  # --force
    with pytest.raises(ConfigError, match=r"2 ranks x 9.05 GiB of this model"):  # ranks share the RAM
        labkit.check_memory(False, MINI, 2048, ranks=2)
    labkit.check_memory(False, MINI, 16, ranks=2)  # the labs' defaults fit


# The argv of a notebook kernel, in which a lab's cells run (sys.argv[0] is the kernel's launcher).
KERNEL_ARGVS = {
    "jupyter": ["/usr/lib/python3/site-packages/ipykernel_launcher.py", "-f",
                "/root/.local/share/jupyter/runtime/kernel-3f2a.json"],
    "colab": ["/usr/local/lib/python3.10/dist-packages/colab_kernel_launcher.py", "-f",
              "/root/.local/share/jupyter/runtime/kernel-9c1e.json"],
    "vscode": ["/home/u/.venv/lib/python3.11/site-packages/ipykernel_launcher.py", "--ip=127.0.0.1",
               "--stdin=9003", "--control=9001", "--hb=9000", '--Session.signature_scheme="hmac-sha256"',
               '--Session.key=b"5af3178f"', "--shell=9002", '--transport="tcp"', "--iopub=9004",
               "--f=/tmp/tmp-767twhenXI72afC.json"],
    "python -m ipykernel": ["/usr/lib/python3/site-packages/ipykernel/__main__.py", "-f", "k-1.json"],
}


def _parser():
    """A lab's parser in miniature."""
    parser = labkit.lab_parser("a lab")
    parser.add_argument("--batch-size", type=labkit.positive_int, default=16)
    parser.add_argument("--ranks", type=labkit.positive_int, default=2, help="tp ranks to spawn")
    return parser


@pytest.fixture
def lab_env(monkeypatch, tmp_path):
    """parse() exports --out and installs an excepthook: both are undone after the test."""
    monkeypatch.setenv(labkit.RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    return tmp_path


@pytest.mark.parametrize("kernel", KERNEL_ARGVS)
def test_a_notebook_kernels_argv_is_not_the_labs(lab_env, capsys, kernel):
    argv = KERNEL_ARGVS[kernel]
    assert labkit.parse(_parser(), "lab", argv).batch_size == 16
    # a notebook may set sys.argv for the lab: those flags count, strictly
    assert labkit.parse(_parser(), "lab", [*argv, "--batch-size", "4"]).batch_size == 4
    with pytest.raises(SystemExit) as exit_:
        labkit.parse(_parser(), "lab", [*argv, "--tp", "4"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --tp 4 (--tp: did you mean --ranks?" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["lab.py", "--batch", "4"], "unrecognized arguments: --batch 4 (--batch: did you mean --batch-size?"),
    (["lab.py", "-f", "kernel.json"], "unrecognized arguments: -f kernel.json"),  # not in a kernel
    (["lab.py", "--batch-size", "0"], "argument --batch-size: 0 must be a positive integer (>= 1)"),
    (["lab.py", "--batch-size", "4.5"], "argument --batch-size: '4.5' is not an integer"),
])
def test_the_command_line_is_parsed_strictly(lab_env, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        labkit.parse(_parser(), "lab", argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_out_redirects_results_before_anything_runs(lab_env):
    out = lab_env / "elsewhere"
    labkit.parse(_parser(), "lab", ["lab.py", "--out", str(out)])
    assert os.environ[labkit.RUNS_ENV] == str(out)  # runtime.runs_dir, and so every rank, writes there
    with pytest.raises(ConfigError, match="runs is a file, not a directory"):
        labkit.parse(_parser(), "lab", ["lab.py", "--out", _text_file(lab_env, b"x", "runs")])


def test_journey_estimate_checks_its_output_directory_first(tmp_path, capsys, monkeypatch):
    """It used to estimate (and measure) first, then crash writing runs/estimate/ with a traceback."""
    monkeypatch.delenv(labkit.RUNS_ENV, raising=False)
    runs = _text_file(tmp_path, b"x", "runs")
    assert journey(["estimate", "--preset", "tiny", "--measure", "no", "--out", runs]) == 2
    err = capsys.readouterr().err
    assert "journey: error: cannot write results to" in err and "pass --out DIR" in err
    assert journey(["estimate", "--preset", "tiny", "--measure", "no", "--out", str(tmp_path / "ok")]) == 0
    assert list((tmp_path / "ok" / "estimate").glob("tiny_*.json"))


@pytest.mark.parametrize("lab, args, message", [
    ("03_tensor_parallel.py", ["--batch-size", "0"], "argument --batch-size: 0 must be a positive integer"),
    ("02_data_parallel.py", ["--steps", "0"], "argument --steps: 0 must be a positive integer"),
    ("02_data_parallel.py", ["--batch-size", "7"], "global batch 7 is not divisible by dp*microbatches"),
    ("04_pipeline_parallel.py", ["--sweep", "1,x"], "argument --sweep: '1,x': want comma-separated integers"),
    ("10_reliability.py", ["--keep", "1"], "--keep 1: the truncated-checkpoint step needs a previous"),
    ("10_reliability.py", ["--desync", "op,deadlock"], "--desync deadlock: no such scenario; use some"),
    pytest.param("06_zero_and_fsdp.py", ["--ranks-2d", "6", "--tp-2d", "4"],
                 "dp=1 x tp=4 = 4 ranks, but the world has 6", marks=pytest.mark.slow),
])
def test_labs_reject_bad_arguments_before_any_rank_starts(tmp_path, lab, args, message):
    """Each of these used to pass the checks and fail inside a rank (or after the training)."""
    proc = _run_lab(tmp_path, lab, args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lab10_runs_in_its_own_directory_and_deletes_only_its_entries(tmp_path):
    """A directory lab 10 owns (as after an earlier run), holding an old checkpoint entry and the
    learner's notes: the run succeeds, the old entry is replaced, the notes survive."""
    own = labkit.claim_dir(tmp_path / "ckpt", "10_reliability", "--dir")
    (own / "file").mkdir()
    stale = own / "file" / "step_00000099.pt"
    stale.write_bytes(b"an earlier run's checkpoint")
    (own / "notes.txt").write_text("the learner's own notes\n")
    proc = _run_lab(tmp_path, "10_reliability.py", ["--preset", "tiny", "--steps", "4", "--every", "1",
                                                    "--crash-at", "2", "--dir", str(own),
                                                        "--desync", "none"], timeout_s=900)  # own test
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (own / "notes.txt").read_text() == "the learner's own notes\n" and not stale.exists()
    assert sorted(p.name for p in own.iterdir()) == sorted([labkit.OWNER_FILE, "notes.txt", "file", "dcp",
                                                            "dead_rank"])


def test_labs_take_the_timeout_flags(monkeypatch):
    """Every lab's parser has --hang-timeout and --collective-timeout (runtime.add_timeout_flags);
    parsing them exports the environment the ranks read (restored by monkeypatch afterwards)."""
    from journey_dist.labkit import lab_parser

    monkeypatch.setenv("JOURNEY_HANG_TIMEOUT", "30")
    monkeypatch.setenv("JOURNEY_TIMEOUT", "120")
    parser = lab_parser("doc")
    with pytest.raises(SystemExit):
        parser.parse_args(["--hang-timeout", "-3"])
    assert parser.parse_args(["--hang-timeout", "0", "--collective-timeout", "30"]).hang_timeout == 0
    assert float(os.environ["JOURNEY_HANG_TIMEOUT"]) == 0 and float(os.environ["JOURNEY_TIMEOUT"]) == 30
