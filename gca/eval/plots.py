"""Plots users would rather look at than read: accuracy against context length, the familiar
needle-in-a-haystack heatmap (depth x length), perplexity against context length, and training
curves with the retrieval's health."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gca.retrieval import COLLAPSED_SPREAD  # noqa: E402


def _fmt_len(n: int) -> str:
    for unit, div in (("M", 2**20), ("K", 2**10)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v >= 10 or v == int(v) else f"{v:.1f}{unit}"
    return str(n)


def plot_accuracy_vs_length(rows: list[dict], path: str, key: str = "accuracy", train_length: int | None = None,
                            title: str | None = None) -> str:
    """One line per task: ``key`` (mean over depths) against context length (log scale); rows whose
    ``key`` is None (a baseline's ``retrieval_hit``) are left out."""
    rows = [r for r in rows if r[key] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in sorted({r["task"] for r in rows}):
        lens = sorted({r["context_length"] for r in rows if r["task"] == task})
        vals = [100 * np.mean([r[key] for r in rows if r["task"] == task and r["context_length"] == n]) for n in lens]
        ax.plot(lens, vals, marker="o", label=task)
    ax.set_ylim(-3, 103)
    ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
    ax.set_title(title or f"{key.replace('_', ' ')} against context length")
    return _finish_length_plot(fig, ax, path, train_length)


def plot_heatmap(rows: list[dict], path: str, task: str | None = None, key: str = "accuracy",
                 title: str | None = None) -> str:
    """Depth (rows) x context length (columns) heatmap of ``key`` for one task."""
    task = task or rows[0]["task"]
    rs = [r for r in rows if r["task"] == task]
    lens = sorted({r["context_length"] for r in rs})
    depths = sorted({r["depth"] for r in rs})
    grid = np.full((len(depths), len(lens)), np.nan)
    for r in rs:
        grid[depths.index(r["depth"]), lens.index(r["context_length"])] = 100 * r[key]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lens), 1.0 + 0.45 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lens)), [_fmt_len(n) for n in lens])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    for i in range(len(depths)):
        for j in range(len(lens)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"{task}: {key.replace('_', ' ')} (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ppl_vs_length(rows: list[dict], path: str, train_length: int | None = None) -> str:
    """One line per model: perplexity against context length. Rows without a ``model`` (as
    :func:`gca.eval.perplexity.perplexity_vs_length` returns them) make one unlabelled line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r.get("model") for r in rows}, key=str):
        rs = sorted((r for r in rows if r.get("model") == model), key=lambda r: r["context_length"])
        ax.plot([r["context_length"] for r in rs], [math.nan if r["ppl"] is None else r["ppl"] for r in rs], marker="o",
                label=model if model is not None else "_nolegend_")
    ax.set_ylabel("perplexity")
    return _finish_length_plot(fig, ax, path, train_length)


def _finish_length_plot(fig, ax, path: str, train_length: int | None) -> str:
    """Log-2 length axis, the training length marked, grid, legend; save and close."""
    if train_length:
        ax.axvline(train_length, color="gray", ls="--", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty legend is only a matplotlib warning
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _running_mean(steps, values, smooth: int) -> tuple[list, list, str | None]:
    """``(steps, values, marker)`` of a training curve: the running mean over ``smooth`` values, from the
    ``smooth``-th on, unmarked; a log with no more rows than ``smooth`` is drawn as logged, each row
    marked (its mean would be a single point nobody sees)."""
    if len(values) <= smooth:
        return list(steps), list(values), "."
    return list(steps[smooth - 1 :]), list(np.convolve(values, np.ones(smooth) / smooth, mode="valid")), None


def plot_training_logs(logs: dict[str, list[dict]], path: str, smooth: int = 5) -> str:
    """Training runs side by side: training loss (a running mean over ``smooth`` logged rows; a run
    with no more rows than that is drawn as logged, marked),
    validation loss and, when the runs are DRTs, the retrieval score spread (log scale, the
    collapse line marked) and what GCA is worth (``val_gca_gain``, where logged). ``logs`` maps a
    run's label to its ``log.jsonl`` rows."""
    if not logs:
        raise ValueError("no training logs to plot")
    health = any("val_retr_spread" in r for rows in logs.values() for r in rows)
    gain = any("val_gca_gain" in r for rows in logs.values() for r in rows)
    copy = any("retrieval_copy_loss" in r for rows in logs.values() for r in rows)
    n_ax = 2 + health + gain + copy
    fig, axes = plt.subplots(1, n_ax, figsize=(5 * n_ax, 4))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    as_logged = False  # a training loss drawn unsmoothed: the title says so
    for i, (label, rows) in enumerate(logs.items()):
        c = cycle[i % len(cycle)]  # a run keeps its colour in every panel, whichever panels it appears in
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        if train:
            steps, loss, marker = _running_mean(*zip(*train), smooth)
            axes[0].plot(steps, loss, marker=marker, label=label, color=c)
            as_logged |= marker is not None
        if val:
            axes[1].plot([r["step"] for r in val], [r["val_loss"] for r in val], marker=".", label=label, color=c)
        if health and any("val_retr_spread" in r for r in val):
            hv = [r for r in val if "val_retr_spread" in r]
            axes[2].plot([r["step"] for r in hv], [max(r["val_retr_spread"], 1e-6) for r in hv], marker=".", label=label,
                         color=c)
        if gain and any("val_gca_gain" in r for r in val):
            gv = [r for r in val if "val_gca_gain" in r]
            axes[2 + health].plot([r["step"] for r in gv], [r["val_gca_gain"] for r in gv], marker=".", label=label,
                                  color=c)
        cv = [(r["step"], r["retrieval_copy_loss"]) for r in rows if "retrieval_copy_loss" in r]
        if cv:
            steps, aux, marker = _running_mean(*zip(*cv), smooth)
            axes[-1].plot(steps, aux, marker=marker, label=label, color=c)
    mean = f" (mean of {smooth} logged steps{'; marked: as logged' if as_logged else ''})" if smooth > 1 else ""
    axes[0].set_title("training loss" + mean
                      + ("\n(with retrieval_copy_loss: includes its weighted term)" if copy else ""))
    axes[1].set_title("validation loss")
    if health:
        ax = axes[2]
        ax.set_yscale("log")
        ax.axhline(COLLAPSED_SPREAD, color="gray", ls="--", lw=1, label="collapsed below")
        ax.set_title("retrieval score spread (val_retr_spread)")
    if gain:
        axes[2 + health].axhline(0.0, color="gray", ls="--", lw=1)
        axes[2 + health].set_title("validation loss without GCA minus with (val_gca_gain)")
    if copy:
        axes[-1].set_title("auxiliary retrieval loss (retrieval_copy_loss, unweighted)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # e.g. no validation rows yet: no warning about an empty legend
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
