"""Retrieval hit and accuracy against context length, from the rows `gca eval tasks` writes.

    python scripts/plot_retrieval_hits.py --out hits.png \
        "drt (collapsed)=results/repro-small-mix/eval/drt_tasks.json" \
        "drt-centered=results/repro-nocollapse/eval/drt-centered_tasks.json"

One panel per task (passkey, multikey; 2hop too with --tasks), depths pooled: a solid line for how
often the chunk holding the needle was among the retrieved chunks, a dashed one for exact-match
accuracy. The gap between the two is reading, not retrieval.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pooled(rows: list[dict], task: str) -> dict[int, tuple[float, float, int]]:
    """context length -> (hit %, accuracy %, trials), pooled over depths (rows without a retrieval hit,
    a baseline's, are left out)."""
    acc = defaultdict(lambda: [0.0, 0.0, 0])
    for r in rows:
        if r["task"] == task and r.get("retrieval_hit") is not None:  # None: a baseline without retrieval
            p = acc[r["context_length"]]
            p[0] += r["retrieval_hit"] * r["trials"]
            p[1] += r["accuracy"] * r["trials"]
            p[2] += r["trials"]
    return {L: (100 * h / n, 100 * a / n, n) for L, (h, a, n) in sorted(acc.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=tasks.json")
    p.add_argument("--tasks", default="passkey,multikey")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    runs = []
    for spec in a.runs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=PATH, got {spec!r}")
        runs.append((name, json.load(open(path))))
    tasks = a.tasks.split(",")
    empty = [t for t in tasks if not any(pooled(rows, t) for _, rows in runs)]
    if empty:  # (drawn as an empty panel, without a word)
        raise SystemExit(f"no rows of task {', '.join(empty)} in any file; --tasks picks from those the files hold")
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (name, rows) in enumerate(runs):
            pts = pooled(rows, task)
            if not pts:
                continue
            L = list(pts)
            ax.plot(L, [pts[x][0] for x in L], "o-", color=f"C{i}", label=f"{name}: retrieval hit")
            ax.plot(L, [pts[x][1] for x in L], "x--", color=f"C{i}", label=f"{name}: accuracy")
        ax.set_xscale("log")
        ax.set_ylim(-3, 103)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("% of trials")
    handles, labels = [], []  # every panel's lines, once: a run with no rows of the first task is still named
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(runs)), fontsize=8)
    if a.title:
        fig.suptitle(a.title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(runs) - 1) // 3 + 1), 1, 1))
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "plot_retrieval_hits.py")
