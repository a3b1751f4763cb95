"""Wrong configs and arguments fail before training with a ConfigError naming problem and fix.

Each row: (what is wrong, a call that must raise, a regex for the problem, a regex for the fix).
Nothing here starts a process group: these checks run before any rank exists.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from journey_dist.cli import main as journey
from journey_dist.config import ConfigError, GPTConfig, ParallelConfig, check_bucket_mb, get_preset
from journey_dist.data import ByteTokenizer, TokenData, check_fits, load_text, load_tokens
from journey_dist.model import GPT
from journey_dist.parallel.deepspeed_zero import load_config
from journey_dist.train import TrainConfig, train

MINI = get_preset("gpt-mini")  # 4 layers, 4 heads, vocab 256, block 128
ROOT = Path(__file__).resolve().parents[1]


def _text_file(tmp_path: Path, data: bytes, name: str = "text.txt") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _tokens(n: int) -> TokenData:
    ids = torch.arange(n) % 256
    n_val = n // 10
    return TokenData(ids[: n - n_val], ids[n - n_val:], ByteTokenizer())


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
        train(model, data, TrainConfig(steps=3, batch_size=2), verbose=False,
              step_fn=lambda *a, **k: calls.append(1))
    assert not calls


def test_cli_reports_config_errors_without_a_traceback(capsys, tmp_path):
    assert journey(["estimate", "--preset", "gpt5", "--measure", "no"]) == 2
    assert "journey: error: unknown preset 'gpt5'" in capsys.readouterr().err
    assert journey(["checkpoints", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # --seq 0 used to fall back silently to block_size (`args.seq or block_size`) and print an estimate
    assert journey(["estimate", "--preset", "gpt-mini", "--seq", "0", "--measure", "no"]) == 2
    assert "seq_len=0 must be in 1..block_size=128" in capsys.readouterr().err


def test_lab_rejects_bad_arguments_before_spawning(tmp_path):
    """Lab 02 with a batch that dp=2 cannot split: ConfigError, exit 1, and no rank started."""
    proc = subprocess.run([sys.executable, str(ROOT / "labs/02_data_parallel.py"), "--batch-size", "7"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "ConfigError: global batch 7 is not divisible by dp*microbatches = 2*1" in proc.stderr
    assert "ranks (" not in proc.stdout  # rank_main never ran


@pytest.mark.parametrize("lab, args, message", [
    ("03_tensor_parallel.py", ["--batch-size", "0"], "global batch 0 must be a positive integer"),
    ("02_data_parallel.py", ["--steps", "0"], "TrainConfig.steps=0 must be a positive integer"),
    ("04_pipeline_parallel.py", ["--sweep", "1,x"], "--sweep '1,x': want comma-separated microbatch counts"),
    ("10_reliability.py", ["--keep", "1"], "--keep 1: the truncated-checkpoint step needs a previous"),
])
def test_labs_reject_bad_arguments_before_any_rank_starts(tmp_path, lab, args, message):
    """Each of these used to pass the checks and fail inside a rank (or after the training)."""
    proc = subprocess.run([sys.executable, str(ROOT / "labs" / lab), *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                          "JOURNEY_RUNS_DIR": str(tmp_path)})
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "rank 0 failed" not in proc.stderr and "RankFailure" not in proc.stderr
