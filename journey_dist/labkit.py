"""What every lab does before its first rank starts: strict flags, checked values, an output
directory known to be writable, and directories the lab owns.

    parser = lab_parser(__doc__)                 # adds --out; abbreviations are off
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    args = parse(parser, LAB)                    # unknown flags and bad values: argparse's error, exit 2

After `parse`, a ConfigError that reaches the top level prints one line `<lab>: error: ...` and
exits 2, as `journey` does, instead of a traceback. In a notebook kernel the kernel's own argv
(`-f kernel.json`, VS Code's `--ip=... --f=...`) is dropped, every other argument is parsed as
strictly as on the command line, and a ConfigError is raised as usual.
"""

from __future__ import annotations

import argparse
import difflib
import math
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from journey_dist.config import ConfigError, GPTConfig
from journey_dist.data import TokenData, check_fits
from journey_dist.memory.estimate import estimate_memory, fmt_bytes
from journey_dist.memory.report import too_big_to_measure
from journey_dist.runtime import add_timeout_flags, runs_dir

RUNS_ENV = "JOURNEY_RUNS_DIR"  # runtime.runs_dir reads it; --out sets it, so spawned ranks inherit it

# ----------------------------------------------------------------- parsing

# Programs that start a Jupyter kernel (argv[0] of a kernel process), by file stem.
KERNEL_LAUNCHERS = ("ipykernel_launcher", "colab_kernel_launcher", "xpython_launcher", "spyder_kernels")
# Options a kernel launcher passes as `--name=value` (VS Code; the connection file as --f=...).
KERNEL_OPTIONS = ("f", "ip", "stdin", "control", "hb", "shell", "iopub", "transport", "debug")


def lab_parser(doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser for a lab: its docstring as help, --out, --force, the timeouts
    (--hang-timeout, --collective-timeout) and no abbreviated flags (`--batch` must not silently
    mean `--batch-size`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"write results under DIR/<lab>/ (default: ${RUNS_ENV} or ./runs)")
    parser.add_argument("--force", action="store_true",
                        help="run even when the memory estimate says it does not fit in free memory")
    add_timeout_flags(parser)  # --hang-timeout, --collective-timeout (they set the env the ranks read)
    return parser


def in_kernel(argv0: str) -> bool:
    """True inside a Jupyter-style kernel, whose argv belongs to the kernel, not to the lab."""
    name = Path(argv0).name
    return "ipykernel" in sys.modules or any(name.startswith(k) for k in KERNEL_LAUNCHERS) \
        or (name == "__main__.py" and Path(argv0).parent.name in ("ipykernel", "spyder_kernels"))


def strip_kernel_args(argv: Sequence[str]) -> list[str]:
    """`argv` without a kernel's own arguments: `-f FILE`, `-f=FILE` and `--name=value` for the
    options in KERNEL_OPTIONS or traitlets settings (`--Session.key=...`)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.lstrip("-").split("=", 1)[0]
        if arg == "-f" and i + 1 < len(argv):
            i += 2
            continue
        traitlet = re.fullmatch(r"[A-Z]\w*\.\w+", name)  # --Session.key=...
        if arg.startswith("-") and "=" in arg and (name in KERNEL_OPTIONS or traitlet):
            i += 1
            continue
        out.append(arg)
        i += 1
    return out


def parse(parser: argparse.ArgumentParser, lab: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a lab's arguments strictly (`argv` as sys.argv: program first) and prepare its output.

    Rejects unknown flags with argparse's error and the closest real flag; honours --out (the
    results root, exported as $JOURNEY_RUNS_DIR for the ranks); checks runs/<lab>/ can be
    written before any work starts; from then on a top-level ConfigError is one `error:` line
    and exit status 2 (outside a notebook kernel).
    """
    argv = list(sys.argv if argv is None else argv)
    kernel = in_kernel(argv[0] if argv else "")
    given = strip_kernel_args(argv[1:]) if kernel else argv[1:]
    args, unknown = parser.parse_known_args(given)
    if unknown:
        parser.error(unknown_message(parser, unknown))
    if not kernel:
        exit_on_config_error(parser.prog)
    if args.out is not None:
        os.environ[RUNS_ENV] = str(args.out)
    check_writable_dir(runs_dir(lab), "pass --out DIR (or set JOURNEY_RUNS_DIR) to write results elsewhere")
    return args


def unknown_message(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """'unrecognized arguments: ...' and, per unknown flag, the closest flag of this parser (by
    spelling, else one whose help mentions the word)."""
    actions = [a for a in parser._actions if a.option_strings]
    flags = [s for a in actions for s in a.option_strings if s.startswith("--")]
    hints = []
    for arg in unknown:
        if not arg.startswith("-") or _is_number(arg):
            continue
        name = arg.split("=", 1)[0]
        word = name.lstrip("-")
        close = ["--" + m for m in difflib.get_close_matches(word, [f[2:] for f in flags], n=1, cutoff=0.6)]
        if not close:
            word = word.replace("-", " ")
            close = [a.option_strings[-1] for a in actions if a.help and a.help != argparse.SUPPRESS
                     and re.search(rf"\b{re.escape(word)}\b", a.help)][:1]
        hints.append(f"{name}: did you mean {close[0]}?" if close else f"{name} is not a flag of this lab")
    tail = f" ({'; '.join(hints)}; see --help)" if hints else " (see --help)"
    return f"unrecognized arguments: {' '.join(unknown)}{tail}"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def exit_on_config_error(prog: str) -> None:
    """From now on an uncaught ConfigError prints `prog: error: message` and exits 2 (no traceback);
    any other exception keeps its traceback."""
    previous = sys.excepthook

    def hook(kind, error, tb) -> None:
        if issubclass(kind, ConfigError):
            sys.stdout.flush()
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)  # raised from the hook, Python exits with this status
        previous(kind, error, tb)

    sys.excepthook = hook


def note(message: str) -> None:
    """Print a setup note once: not from spawned ranks re-running the lab's setup, not per torchrun rank."""
    if multiprocessing.parent_process() is None and os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", flush=True)


# ----------------------------------------------------------------- argument types (argparse `type=`)


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number; pass a finite value")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer (>= 1)")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be a positive number (> 0)")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be >= 0")
    return value


def probability(text: str) -> float:
    """A dropout-style probability in [0, 1)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value:g} must be in [0, 1) (0: off)")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. 1,2,4,8."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated integers >= 1, e.g. 1,2,4,8")
    return values


def name_list(choices: Sequence[str]):
    """An argparse type: comma-separated names, each one of `choices`, e.g. ring,zigzag."""
    def parse_names(text: str) -> tuple[str, ...]:
        names = tuple(n for n in text.split(",") if n)
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated names from {','.join(choices)}")
        return names
    return parse_names


# ----------------------------------------------------------------- checks that need several flags


def check_data(parser: argparse.ArgumentParser, data: TokenData, batch_size: int, block_size: int) -> None:
    """data.check_fits, with the fix spelled in this lab's flags (--data, --batch-size or --batch)."""
    flags = {s for a in parser._actions for s in a.option_strings}
    names = {"data": "--data" if "--data" in flags else None,
             "batch_size": next((f for f in ("--batch-size", "--batch") if f in flags), None)}
    check_fits(data, batch_size, block_size, flags={k: v for k, v in names.items() if v})


def check_memory(force: bool, config: GPTConfig, batch_size: int, seq_len: int | None = None,
                 ranks: int = 1) -> None:
    """Refuse, before allocating, a run whose training steps are estimated not to fit.

    Each of the `ranks` processes is counted as holding the whole model and batch (fp32 AdamW,
    memory.estimate_memory), as the labs' single-process references do. Ranks with one GPU
    each are checked against that GPU, ranks sharing the CPU against RAM together; the limit is
    `journey estimate`'s (memory.report.too_big_to_measure). `force` (--force) skips the check.
    """
    seq_len = config.block_size if seq_len is None else seq_len
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    on_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local
    device = "cuda" if on_gpus else "cpu"
    peak = estimate_memory(config, batch_size=batch_size, seq_len=seq_len, device=device).total
    total = peak * (1 if on_gpus else local)
    if (too_big := too_big_to_measure(total, device)) and not force:
        who = f"{local} ranks x {fmt_bytes(peak)}" if local > 1 and not on_gpus else "one training step"
        raise ConfigError(f"{who} of this model at batch {batch_size} x {seq_len}: {too_big} ({device}); "
                          "use a smaller --preset or batch, or pass --force to run anyway")


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """--device: None picks cuda if available, else cpu; a name that is not a usable device is a
    ConfigError."""
    if name is None:
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: this lab runs on cpu or cuda; use one of them")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but CUDA is not available here; use --device cpu "
                          "(or leave it out)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                          f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def existing_file(path: str, flag: str, fix: str = "pass an existing file") -> Path:
    """`path` as a Path if it is a file, else a ConfigError naming `flag` and `fix`."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory, not a file; {fix}")
    if not p.is_file():
        raise ConfigError(f"{flag} {path} not found; {fix}")
    return p


# ----------------------------------------------------------------- output directories


def check_writable_dir(path: str | Path, fix: str) -> Path:
    """Raise ConfigError unless `path` is, or can be created as, a writable directory.

    Checked without creating anything: the deepest existing part of the path must be a
    directory this process may write into. `fix` says how to write elsewhere.
    """
    path = Path(path)
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(f"cannot write results to {path}: {existing} is a broken symbolic link; {fix}")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write results to {path}: {existing} is a file, not a directory; "
                          f"move it away, or {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write results to {path}: {existing} is not writable; {fix}")
    return path


OWNER_FILE = ".journey-lab"


def claim_dir(path: str | Path, lab: str, flag: str) -> Path:
    """Make `path` a directory `lab` owns, so that it may later delete what it wrote there.

    A new directory (or an empty one) gets an owner file naming the lab; a directory that
    already has the lab's owner file is accepted; anything else (a file, a directory holding
    someone's files) is refused with a fresh path to use instead. Nothing is deleted here.
    """
    path = Path(path)
    check_writable_dir(path, f"pass {flag} with a new directory, e.g. {flag} {_fresh(path.parent, lab)}")
    owner = path / OWNER_FILE
    if path.is_dir() and not owner.is_file():
        contents = sorted(p.name for p in path.iterdir())
        if contents:
            shown = ", ".join(contents[:3]) + (", ..." if len(contents) > 3 else "")
            raise ConfigError(
                f"{flag} {path} already holds files this lab did not create ({shown}); it deletes only "
                f"what it created, so it will not use this directory; pass a new one, e.g. "
                f"{flag} {_fresh(path, lab)}")
    elif path.is_dir() and owner.read_text().split("\n", 1)[0] != lab:
        raise ConfigError(f"{flag} {path} belongs to another lab ({owner.read_text().splitlines()[0]}); "
                          f"pass a new directory, e.g. {flag} {_fresh(path, lab)}")
    path.mkdir(parents=True, exist_ok=True)
    if not owner.is_file():
        owner.write_text(f"{lab}\nThis directory was created for labs/{lab}.py, which replaces its own "
                         "entries here on every run and deletes nothing else.\n")
    return path


def clear_owned(path: str | Path, lab: str, names: Iterable[str]) -> None:
    """Delete the entries `names` (this lab's own outputs) inside `path`, a directory claim_dir gave
    `lab`; nothing else in it is touched."""
    path = Path(path)
    owner = path / OWNER_FILE
    if not owner.is_file() or owner.read_text().split("\n", 1)[0] != lab:
        raise ConfigError(f"{path} is not a directory {lab} created (no {OWNER_FILE}); "
                          "refusing to delete in it")
    for name in names:
        if Path(name).name != name or name in ("", ".", "..", OWNER_FILE):
            raise ValueError(f"clear_owned takes entry names inside {path}, got {name!r}")
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


def _fresh(parent: Path, lab: str) -> Path:
    """A path under `parent` that does not exist yet."""
    candidate, i = parent / lab, 2
    while candidate.exists():
        candidate, i = parent / f"{lab}-{i}", i + 1
    return candidate
