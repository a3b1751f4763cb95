"""The README is the contract: its test command is what CI runs, and it lists every lab."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start_commands() -> list[str]:
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_every_lab_is_in_the_readme_table():
    # the table's rows, not any mention elsewhere in the README; one row per lab, in lab order
    table = re.search(r"## Labs\n.*?\n(\|.*?)\n\n", README, re.S).group(1)
    in_table = re.findall(r"^\| \d\d [^|]*\| `python (labs/\d\d_\w+\.py)`", table, re.M)
    labs = [f"labs/{lab.name}" for lab in sorted((ROOT / "labs").glob("[0-9][0-9]_*.py"))]
    assert in_table == labs, f"README lab table rows {in_table} != labs/ {labs}"
