"""The PNG figures labs save next to their JSON, drawn from the rows the JSON holds.

    compression_plot(rows, runs_dir(LAB) / "compression.png", corpus="handbook")

Drawn with matplotlib's object API (a `Figure`, no pyplot): no global backend is chosen, so a
notebook's inline backend is left alone, and nothing stays open after the file is written.
Kept out of report.py so that printing a table never imports matplotlib (about a second).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def compression_plot(rows: list[dict], path: str | Path, corpus: str) -> Path:
    """Bytes per token against BPE merges on train and held-out text
    (vocab_growth.compression_by_merges rows)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    merges = [r["merges"] for r in rows]
    ax.plot(merges, [r["train_bytes_per_token"] for r in rows], "o-", label="train text")
    ax.plot(merges, [r["val_bytes_per_token"] for r in rows], "s--", label="held-out text")
    ax.set(xlabel="BPE merges (vocabulary = 256 + merges)", ylabel="bytes per token",
           title=f"BPE compression on {corpus}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path, dpi=120)


def vocab_growth_plot(growth: dict[str, dict], vocab_rows: list[dict], path: str | Path) -> Path:
    """Left: distinct words against words read, per corpus, with its Heaps fit K n^beta
    (vocab_growth.heaps_curve). Right: bytes per token against BPE vocabulary size per text
    (vocab_growth.bpe_compression rows)."""
    fig = Figure(figsize=(11, 4))
    ax_heaps, ax_vocab = fig.subplots(1, 2)
    for name, g in growth.items():
        ax_heaps.loglog(g["n"], g["types_at_n"], "o", ms=3, label=name)
        ax_heaps.loglog(g["n"], [g["K"] * x ** g["beta"] for x in g["n"]], "-", lw=1,
                        label=f"{g['K']:.1f} n^{g['beta']:.2f}")
    ax_heaps.set(xlabel="words read (n)", ylabel="distinct words V(n)", title="Heaps' law")
    ax_heaps.legend()
    sizes = [r["vocab"] for r in vocab_rows]
    for key, style in zip([k for k in vocab_rows[0] if k != "vocab"], ("o-", "s--", "^:", "d-.")):
        ax_vocab.plot(sizes, [r[key] for r in vocab_rows], style, label=key)
    ax_vocab.set(xscale="log", xlabel="BPE vocabulary size", ylabel="bytes per token",
                 title="compression vs vocabulary")
    ax_vocab.legend()
    return _save(fig, path, dpi=120)


def kv_memory_plot(runs: dict[str, dict], path: str | Path) -> Path:
    """One panel per serving run: KV cache tokens reserved and used over time, from each run's
    "kv_timeline" [(seconds, used, reserved), ...] (serving.scheduler.compare_batching)."""
    fig = Figure(figsize=(4 * len(runs), 3))
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (name, r) in zip(axes, runs.items()):
        t, used, reserved = zip(*r["kv_timeline"])
        ax.step(t, reserved, where="post", label="reserved")
        ax.step(t, used, where="post", label="used")
        ax.set(title=name, xlabel="seconds")
    axes[0].set(ylabel="KV cache (tokens)")
    axes[0].legend()
    return _save(fig, path, dpi=110)
