"""The tables labs print: parity with one process, losses per step, collectives measured vs the
formula, bytes per rank. Each helper returns text (a lab prints it with print0), so a lab's code
reads as the steps of its idea and its printing stays a few lines.

    print0(parity_table({"tp": diffs, "dtensor": diffs2}, tol=1e-5))
    print0(ledger_table({"tp": (run.comm, run.analytic)}))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Column = tuple[str, str, Callable[[Any], str]]  # (key, header, format)


def sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fixed(digits: int) -> Callable[[float | None], str]:
    return lambda x: "-" if x is None else f"{x:.{digits}f}"


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.3f}"


def table(rows: Sequence[dict], columns: Sequence[Column], *, first: str | None = None) -> str:
    """A fixed-width text table: one line per row, a column per (key, header, format); the first
    column (the row's name, `first` or the first key) is left-aligned, the rest right-aligned."""
    head = [h for _, h, _ in columns]
    body = [[fmt(row.get(key)) for key, _, fmt in columns] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join(line(cells) for cells in [head, *body])


def losses_table(reference: Sequence[float], runs: dict[str, Sequence[float]], digits: int = 5) -> str:
    """The loss of every step: one process next to each run."""
    rows = [{"step": i, "1 process": ref, **{name: losses[i] for name, losses in runs.items()}}
            for i, ref in enumerate(reference)]
    f = fixed(digits)
    return table(rows, [("step", "step", str), ("1 process", "1 process", f),
                        *((name, name, f) for name in runs)])


def parity_table(diffs: dict[str, dict[str, float | None]], *, tol: float | dict[str, float] | None = None,
                 against: str = "1 process", seconds: dict[str, float] | None = None) -> str:
    """Worst |difference| from the reference per run: loss, gradients, parameters (and any other key
    the rows share), with a last column saying whether all are within `tol` (one number, or one per
    key: {"loss": 1e-5, "param": 1e-4})."""
    keys = [k for k in ("loss", "grad", "param", "val_loss") if any(k in d for d in diffs.values())]
    keys += sorted({k for d in diffs.values() for k in d} - set(keys))
    rows = []
    for name, d in diffs.items():
        row = {"name": name, **d}
        if seconds is not None:
            row["seconds"] = seconds.get(name)
        if tol is not None:
            limit = tol if isinstance(tol, dict) else dict.fromkeys(d, tol)
            row["ok"] = "yes" if all(v is None or v <= limit[k] for k, v in d.items()) else "NO"
        rows.append(row)
    cols: list[Column] = [("name", f"vs {against}", str), *((k, f"max|{k}|", sci) for k in keys)]
    if seconds is not None:
        cols.append(("seconds", "train s", fixed(1)))
    if tol is not None:
        head = (f"<= {tol:g}" if not isinstance(tol, dict) else
                "<= " + ", ".join(f"{tol[k]:g}" for k in keys if k in tol))
        cols.append(("ok", head, str))
    return table(rows, cols)


def ledger_table(runs: dict[str, tuple[dict, dict]], *, wire: bool = True) -> str:
    """One line per (run, collective): calls and bytes measured by the CommLedger next to the formula.

    `runs` maps a name to (measured, analytic), each {op: {"calls", "bytes", ...}}; an op the
    formula does not model shows '-' and counts as a mismatch.
    """
    rows = []
    for name, (measured, analytic) in runs.items():
        for op in sorted(set(measured) | set(analytic)):
            m, a = measured.get(op, {}), analytic.get(op)
            same = a is not None and m.get("calls") == a.get("calls") and m.get("bytes") == a.get("bytes")
            rows.append({"run": name, "op": op, "calls": m.get("calls", 0),
                         "calls_f": None if a is None else a.get("calls"), "bytes": m.get("bytes", 0),
                         "bytes_f": None if a is None else a.get("bytes"),
                         "wire": m.get("wire_bytes"), "match": "yes" if same else "NO"})
    cols: list[Column] = [("run", "run", str), ("op", "collective", str), ("calls", "calls", str),
                          ("calls_f", "formula", num), ("bytes", "bytes", num), ("bytes_f", "formula", num)]
    if wire:
        cols.append(("wire", "sent (ring)", num))
    cols.append(("match", "match", str))
    return table(rows, cols)


def ledger_matches(runs: dict[str, tuple[dict, dict]]) -> bool:
    """True when every measured collective of every run equals its formula (calls and bytes)."""
    return all(set(m) == set(a) and all(m[op]["calls"] == a[op]["calls"] and m[op]["bytes"] == a[op]["bytes"]
                                        for op in m) for m, a in runs.values())


def bytes_table(rows: dict[str, dict[str, tuple[float | None, float | None]]]) -> str:
    """Per-rank bytes, measured / estimated, in MiB: {row name: {column: (measured, estimated)}}."""
    keys = list(dict.fromkeys(k for cells in rows.values() for k in cells))
    flat = [{"name": name, **{k: f"{mib(m)} / {mib(e)}" for k, (m, e) in cells.items()}}
            for name, cells in rows.items()]
    cols: list[Column] = [("name", "MiB: measured / estimated", str)]
    cols += [(k, k, lambda x: x or "-") for k in keys]
    return table(flat, cols)


def generation_line(gen: dict, new_tokens: int) -> str:
    """tensor/generate.compare_tp_generation's result in two lines: tokens and logits vs one process,
    and this rank's KV cache next to its formula."""
    ok = {True: "yes", False: "NO"}
    return (f"generate {new_tokens} tokens (KV cache): greedy tokens identical to one process: "
            f"{ok[gen['greedy_identical']]}, max|logit| {gen['max_logit_diff']:.1e}; sampled alike on every "
            f"rank: {ok[gen['sampled_same_on_ranks']]}\nKV cache per rank {gen['cache_bytes_per_rank']:,} B "
            f"= formula {gen['cache_bytes_formula']:,} B ({gen['heads_per_rank']} kv heads) = "
            f"{gen['cache_bytes_per_rank'] / gen['cache_bytes_one_process']:.2f} x one process's")


def bubble_table(rows: Sequence[dict]) -> str:
    """Pipeline bubble per (schedule, m): measured idle fraction next to the schedule's formula
    (orders.bubble_formula), their difference, and the activation sets each stage held at once
    next to orders.inflight_formula (pipeline/timeline.bubble_row rows)."""
    rows = [{**r, "diff": r["measured"] - r["formula"],
             "name": r["schedule"] + (f" v={r['v']}" if r.get("v", 1) > 1 else "")} for r in rows]
    return table(rows, [("name", "schedule", str), ("m", "m", str), ("measured", "measured", fixed(3)),
                        ("formula", "formula", fixed(3)), ("diff", "diff", lambda x: f"{x:+.3f}"),
                        ("peak_inflight", "held per stage", str), ("inflight_formula", "formula", str)])


def buckets_table(caps: dict[float, Sequence[int]], chosen: float | None = None,
                  ddp: dict[str, Sequence[int]] | None = None, *, show: int = 6) -> str:
    """Gradient buckets (bytes each; one all-reduce per bucket and step) for each cap in MiB, the
    `chosen` cap marked, then DDP's own record ({"first_iteration": [...], "rebuilt": [...]}): per
    layout the number of buckets, their total and the first `show` sizes, in MiB."""
    layouts = {f"cap {mb:g} MiB" + (" (chosen)" if mb == chosen else ""): sizes for mb, sizes in caps.items()}
    layouts |= {f"DDP {when.replace('_', ' ')}": sizes for when, sizes in (ddp or {}).items()}
    rows = [{"name": name, "calls": len(sizes), "total": sum(sizes),
             "sizes": ", ".join(f"{b / 2**20:.2f}" for b in sizes[:show]) + (", ..." * (len(sizes) > show))}
            for name, sizes in layouts.items()]
    return table(rows, [("name", "buckets", str), ("calls", "all-reduces", str), ("total", "MiB", mib),
                        ("sizes", "bucket MiB", str)])



def mesh_comm_table(rows: Sequence[dict], steps: int) -> str:
    """Bytes per training step each rank handed to collectives, per group kind and op, as
    'ledger / formula', and whether all of a rank's match: `rows` as parallel.compose.comm_per_rank
    gathers them ({"rank", "coords", "comm": {kind: {op: {"bytes", ...}}} over `steps` steps,
    "expected": {kind: {op: bytes}}}); a column per modelled (kind, op), '-' where a rank has none."""
    cols = list(dict.fromkeys((kind, op) for r in rows for kind, ops in r["expected"].items() for op in ops))
    flat = []
    for r in rows:
        c, same = r["coords"], True
        row = {"rank": r["rank"], "coords": f"{c['pp']},{c['dp']},{c['tp']}"}
        for kind, op in cols:
            want = r["expected"].get(kind, {}).get(op)
            got = r["comm"].get(kind, {}).get(op, {}).get("bytes", 0) / steps
            row[f"{kind} {op}"] = None if want is None else f"{got:,.0f} / {want:,}"
            same &= want is None or got == want
        flat.append({**row, "match": "yes" if same else "NO"})
    names = [f"{kind} {op}" for kind, op in cols]
    return ("bytes per training step handed to collectives, per rank: ledger / formula\n"
            + table(flat, [("rank", "rank", str), ("coords", "pp,dp,tp", str),
                           *((n, n, lambda x: x or "-") for n in names), ("match", "match", str)]))


def ledger_tables(runs: dict[str, tuple[dict, dict]], *, wire: bool = True) -> str:
    """ledger_table for the collectives a formula models, then apart, one line per (run, collective),
    what the CommLedger measured that no formula here derives (a library's own collectives), so a
    collective without a formula reads as 'not derived', not as a mismatch."""
    modelled = {name: ({op: row for op, row in m.items() if op in a}, a)
                for name, (m, a) in runs.items() if a}
    rest = [{"run": name, "op": op, **row}
            for name, (m, a) in runs.items() for op, row in m.items() if op not in a]
    cols: list[Column] = [("run", "run", str), ("op", "collective", str), ("calls", "calls", str),
                          ("bytes", "bytes", num)]
    if wire:
        cols.append(("wire_bytes", "sent (ring)", num))
    parts = [ledger_table(modelled, wire=wire)] if modelled else []
    if rest:
        parts.append("measured, no formula derived:\n" + table(rest, cols))
    return "\n".join(parts)


def pieces_table(rows: dict[str, dict[str, Sequence[str] | str]], first: str = "word") -> str:
    """How tokenizers split words: one row per word, a column per tokenizer (or a given split),
    pieces joined by '|' with a leading space shown as '▁'; text, so every column is left-aligned."""
    cols = list(dict.fromkeys(c for cells in rows.values() for c in cells))
    lines = [[first, *cols]] + [[word, *(_pieces(cells.get(c, "-")) for c in cols)]
                                for word, cells in rows.items()]
    widths = [max(len(x) for x in col) for col in zip(*lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _pieces(p: Sequence[str] | str) -> str:
    return (p if isinstance(p, str) else "|".join(p)).replace(" ", "▁")


def shapes_table(shapes: Sequence[tuple[str, Sequence[int]]], header: str = "module") -> str:
    """(name, shape) pairs, e.g. model.trace_shapes: one module per line and the shape it outputs."""
    rows = [{"name": name, "shape": str(tuple(shape))} for name, shape in shapes]
    return table(rows, [("name", header, str), ("shape", "output shape", str)])


def checks_table(checks: dict[str, float | None], *, tol: float, header: str = "check") -> str:
    """Named checks of one number each, a max |difference| (None: not run here), with whether each
    is within `tol`: the equalities a lab claims (merged = unmerged, reloaded = saved, ...)."""
    rows = [{"name": name, "diff": d, "ok": "-" if d is None else "yes" if d <= tol else "NO"}
            for name, d in checks.items()]
    return table(rows, [("name", header, str), ("diff", "max|diff|", sci), ("ok", f"<= {tol:g}", str)])
