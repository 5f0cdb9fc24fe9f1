"""Gather the evaluation outputs of ``scripts/reproduce.sh`` into the published result files.

    python scripts/collect_results.py --runs runs/repro --data data/debian-docs --out results
    python scripts/collect_results.py --plots-only      # redraw the plots of results/*.json
    python scripts/collect_results.py --runs NONE --tasks-files a_tasks.json b_tasks.json  # add these models' rows
    python scripts/collect_results.py --plots-only --seed-plot ppl_seeds.png=seeds-small,dis-small  # one figure per set of tags
    python scripts/collect_results.py --plots-only --seed-table drt-seeds-small,swa-seeds-small  # seed by seed, markdown
    python scripts/collect_results.py --plots-only --tasks-plot a.png=drt-x-small,swa-x-small  # these models' accuracy alone

Reads ``RUNS/eval/<arch>-ppl/ppl.json`` and ``RUNS/eval/<arch>-tasks-<L>/tasks.json`` and writes
``OUT/ppl.json`` (``[{model, train_length, context_length, ppl, tokens, corpus}]``, plus ``targets`` and
``windows`` for rows that scored the same text at every length, ``RUNS/eval/<arch>-ppl-fixed/``) and
``OUT/passkey.json`` (``[{model, task, train_length, context_length, accuracy, trials}]``, the
depths pooled; 2hop rows also say ``hop_answer``: ``"chain"`` (the question asks for ``Y , Z``) or
``"end"`` (for Z alone, every 2hop row before 2026-12-01)), replacing the rows of the same models, and a
plot of each: ``ppl_vs_length.png`` (every model but those trained with several seeds), ``passkey_vs_length.png``
and, for the seed groups (models named ARCH-sSEED-TAG), ``ppl_seeds.png`` or the figures ``--seed-plot`` names.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict

from gca.eval import from_strict, strict_rows

TASK_NAMES = {"passkey": "single", "multikey": "multikey", "2hop": "2hop"}


# the keys each kind of row must hold: `gca eval` outputs (read by collect) and OUT's files (merged, drawn)
PPL_KEYS = ("model", "train_length", "context_length", "ppl", "tokens")
TASK_KEYS = ("model", "train_length", "task", "context_length", "accuracy", "trials")
OUT_KEYS = {"ppl.json": ("model", "context_length", "ppl"), "passkey.json": ("model", "task", "context_length", "accuracy")}


class ResultsError(ValueError):
    """A results file this script cannot use; the message names it (the command prints it on one line)."""


def read_rows(path: str, keys: tuple[str, ...] = ("model",)) -> list[dict]:
    """The rows of a results file: a JSON list of objects, each holding ``keys``. An empty file holds
    none; anything else (not JSON, a row without one of ``keys``) is a :class:`ResultsError` naming the
    file and the row, not a traceback from deep inside the merge."""
    with open(path) as f:
        text = f.read()
    if not text.strip():
        return []
    try:
        rows = json.loads(text)
    except ValueError as e:
        raise ResultsError(f"{path} is not JSON ({e}): remake it, or move it away") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ResultsError(f"{path} does not hold a JSON list of result rows (objects)")
    for i, r in enumerate(rows):
        from_strict(r)  # strict JSON's null for a non-finite value (gca eval ppl) back as the float
        missing = [k for k in keys if k not in r] + (["windows"] if "targets" in r and "windows" not in r else [])
        if missing:
            raise ResultsError(f"{path}: row {i} ({r.get('model', 'no model')}) has no {', '.join(missing)}")
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` as JSON through a temporary file and a rename, so that a stop or an error
    mid-write leaves the previous file whole (it holds every other model's rows)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:  # strict JSON: a non-finite value as null, named in the row's "nonfinite"
            json.dump(strict_rows(rows), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _merge(path: str, rows: list[dict], keys: tuple[str, ...] = ("model",)) -> list[dict]:
    """Rows of ``path`` whose model is not in ``rows``, then ``rows``."""
    new_models = {r["model"] for r in rows}
    old = read_rows(path, keys) if os.path.exists(path) else []
    return [r for r in old if r["model"] not in new_models] + rows


def collect(runs: str, corpus: str, task_files: list[str] = ()) -> tuple[list[dict], list[dict]]:
    ppl = []
    # <arch>-ppl: fresh windows per length; <arch>-ppl-fixed (reproduce.sh STAGE=ppl-fixed): the same text
    # scored at every length, whose rows say so (targets: the tokens scored before each end point; windows)
    for f in sorted(glob.glob(os.path.join(runs, "eval", "*-ppl", "ppl.json"))
                    + glob.glob(os.path.join(runs, "eval", "*-ppl-fixed", "ppl.json"))):
        for r in read_rows(f, PPL_KEYS):
            ppl.append(dict(model=r["model"], train_length=r["train_length"], context_length=r["context_length"],
                            ppl=round(r["ppl"], 4), tokens=r["tokens"],
                            # the folder the row was scored on (gca eval writes its --data), else --data's
                            corpus=os.path.basename(os.path.normpath(r["corpus"])) if r.get("corpus") else corpus,
                            **{k: r[k] for k in ("targets", "windows") if "targets" in r}))
    pooled: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    train_len = {}
    for f in sorted(glob.glob(os.path.join(runs, "eval", "*-tasks-*", "tasks.json"))) + list(task_files):
        for r in read_rows(f, TASK_KEYS):
            # 2hop rows written before the chain form (2026-12-01) carry no hop_answer: they asked for the end point
            hop = r.get("hop_answer", "end") if r["task"] == "2hop" else ""
            key = (r["model"], TASK_NAMES[r["task"]], r["context_length"], hop)
            pooled[key][0] += round(r["accuracy"] * r["trials"])
            pooled[key][1] += r["trials"]
            train_len[r["model"]] = r["train_length"]
    tasks = [dict(model=m, task=t, train_length=train_len[m], context_length=L, accuracy=round(c / n, 4), trials=n,
                  **({"hop_answer": hop} if hop else {}))
             for (m, t, L, hop), (c, n) in sorted(pooled.items())]
    return ppl, tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/repro")
    ap.add_argument("--data", default="data/debian-docs", help="the corpus named in ppl.json for rows that do not name their own")
    ap.add_argument("--out", default="results")
    ap.add_argument("--tasks-files", nargs="*", default=[],
                    help="more `gca eval tasks` outputs (tasks.json rows) to pool into passkey.json, by model")
    ap.add_argument("--plots-only", action="store_true", help="only redraw the plots from OUT's ppl.json and passkey.json")
    ap.add_argument("--versus", action="append", default=[], metavar="DRT_TAG=SWA_TAG",
                    help="compare the DRT seeds of DRT_TAG with the sliding window's of SWA_TAG (default: the same "
                         "tag), e.g. dis-small=seeds-small for DRTs pre-trained again beside the window's earlier seeds")
    ap.add_argument("--paired", action="append", default=[], metavar="ARCH-TAG=ARCH-TAG",
                    help="compare two seed groups seed by seed (the seeds both have), e.g. drt-dis-small=drt-seeds-small")
    ap.add_argument("--seed-plot", action="append", default=[], metavar="FILE=TAG[,TAG...]",
                    help="draw the seed groups of these tags (every arch) in OUT/FILE; repeat for several figures "
                         "(default: every tag in ppl_seeds.png)")
    ap.add_argument("--tasks-plot", action="append", default=[], metavar="FILE=MODEL[,MODEL...]",
                    help="draw these models' passkey.json rows alone (one panel a task) in OUT/FILE, e.g. "
                         "passkey_equal_tokens.png=drt-copy-ch4kb-small,full-copy-ch4kb-small,swa-copy-ch4kb-small; "
                         "repeat for several figures (passkey_vs_length.png draws every model)")
    ap.add_argument("--seed-table", action="append", default=[], metavar="ARCH-TAG,ARCH-TAG[,...]",
                    help="print a markdown table, one row per seed these groups share: each group's perplexity at "
                         "the shortest and longest context, its change over the last step, and the first group "
                         "against the second, e.g. drt-dis-stage-small,swa-ctl-stage-small,drt-ctl-stage-small")
    a = ap.parse_args()
    versus, paired = {}, []
    for v in a.versus:
        if v.count("=") != 1:
            ap.error(f"--versus takes DRT_TAG=SWA_TAG, got {v!r}")
        k, w = v.split("=")
        versus[k] = w
    for v in a.paired:
        sides = v.split("=")
        if len(sides) != 2 or not all(re.fullmatch(r"[a-z]+-.+", x) for x in sides):
            ap.error(f"--paired takes ARCH-TAG=ARCH-TAG (e.g. drt-dis-small=drt-seeds-small), got {v!r}")
        paired.append(tuple(tuple(x.split("-", 1)) for x in sides))
    tables = []
    for v in a.seed_table:
        names = v.split(",")
        if len(names) < 2 or not all(re.fullmatch(r"[a-z]+-.+", x) for x in names):
            ap.error(f"--seed-table takes two or more ARCH-TAG groups, comma-separated "
                     f"(e.g. drt-dis-stage-small,swa-ctl-stage-small), got {v!r}")
        tables.append([tuple(x.split("-", 1)) for x in names])
    seed_plots = {}
    for v in a.seed_plot:
        name, _, tags = v.partition("=")
        if not name.endswith(".png") or not tags or "/" in name:
            ap.error(f"--seed-plot takes FILE.png=TAG[,TAG...] (a file name in OUT), got {v!r}")
        seed_plots[name] = tags.split(",")
    tasks_plots = {}
    for v in a.tasks_plot:
        name, _, models = v.partition("=")
        if not name.endswith(".png") or not models or "/" in name or name == "passkey_vs_length.png":
            ap.error(f"--tasks-plot takes FILE.png=MODEL[,MODEL...] (a file name in OUT other than passkey_vs_length.png), "
                     f"got {v!r}")
        tasks_plots[name] = models.split(",")
    if a.plots_only:
        if not any(os.path.exists(os.path.join(a.out, n)) for n in OUT_KEYS):
            ap.error(f"--plots-only: {a.out} holds neither ppl.json nor passkey.json")
        load = lambda name: read_rows(os.path.join(a.out, name), OUT_KEYS[name]) if os.path.exists(os.path.join(a.out, name)) else []
        _plots(load("ppl.json"), load("passkey.json"), a.out, versus, seed_plots, tasks_plots)
        _print_seed_comparison(load("ppl.json"), versus, paired, tables)
        return
    if a.runs != "NONE" and not os.path.isdir(a.runs):
        ap.error(f"--runs {a.runs}: no such folder (--runs NONE reads only --tasks-files)")
    missing = [f for f in a.tasks_files if not os.path.isfile(f)]
    if missing:
        ap.error(f"--tasks-files: no such file {', '.join(missing)}")
    ppl, tasks = collect(a.runs, os.path.basename(os.path.normpath(a.data)), a.tasks_files)
    if not ppl and not tasks:
        print(f"collect_results: nothing to collect: no {a.runs}/eval/*-ppl/ppl.json, *-ppl-fixed/ppl.json or "
              f"*-tasks-*/tasks.json rows{' and no --tasks-files' if not a.tasks_files else ''}; {a.out} is unchanged",
              file=sys.stderr)
        return
    os.makedirs(a.out, exist_ok=True)
    merged = {}
    for name, rows in (("ppl.json", ppl), ("passkey.json", tasks)):
        merged[name] = _merge(os.path.join(a.out, name), rows, OUT_KEYS[name]) if rows else []
        if rows:
            write_rows(os.path.join(a.out, name), merged[name])
            print(f"{name}: {len(rows)} rows from {a.runs}, {len(merged[name])} in all")
    if ppl or tasks:
        _plots(merged["ppl.json"], merged["passkey.json"], a.out, versus, seed_plots, tasks_plots)  # every model in the files
    _print_seed_comparison(merged.get("ppl.json") or [], versus, paired, tables)


def _print_seed_comparison(ppl: list[dict], versus: dict | None = None, paired: list | None = None,
                           tables: list | None = None) -> None:
    groups = seed_groups(ppl)
    for r in seed_comparison(groups, versus):
        vs = f" vs {r['swa_tag']}" if r["swa_tag"] != r["tag"] else ""
        print(f"{r['tag']}{vs} {r['context_length']:>8}: DRT {r['drt']:.2f}, sliding window {r['swa']:.2f} (geometric means "
              f"of {r['seeds'][0]} / {r['seeds'][1]} seeds): {100 * r['diff']:+.1f}% +- {100 * r['se']:.1f}% (log scale, "
              f"one standard error), medians {100 * r['median_diff']:+.1f}%")
    for (arch, tag), seeds in sorted(groups.items()):
        lo, hi, change = last_step_change(seeds)
        if change:
            print(f"{arch}-{tag}: {lo} -> {hi} tokens, per seed {min(change):+.2%} to {max(change):+.2%} "
                  f"({sum(c > 0 for c in change)} of {len(change)} rise), mean {statistics.mean(change):+.2%}")
    for a, b in paired or []:
        if a not in groups or b not in groups:
            print(f"--paired: no seed group {'-'.join(a if a not in groups else b)} in ppl.json")
            continue
        for r in paired_comparison(groups[a], groups[b]):
            print(f"{'-'.join(a)} vs {'-'.join(b)} {r['context_length']:>8}, seed by seed ({r['seeds']} seeds): "
                  f"{100 * r['diff']:+.1f}% +- {100 * r['se']:.1f}% (one standard error), median {100 * r['median_diff']:+.1f}%")
        sp = paired_spread(groups[a], groups[b])
        if sp:
            print(f"{'-'.join(a)} vs {'-'.join(b)} {sp['context_length']:>8}: seed spread (standard deviation of log ppl) "
                  f"{sp['sd_a']:.3f} / {sp['sd_b']:.3f}; the per-seed log ratio correlates {_corr(sp['corr_a'])} with "
                  f"{'-'.join(a)}'s log ppl, {_corr(sp['corr_b'])} with {'-'.join(b)}'s")
    for names in tables or []:
        missing = [n for n in names if n not in groups]
        if missing:
            print(f"--seed-table: no seed group {', '.join('-'.join(n) for n in missing)} in ppl.json")
            continue
        print("\n".join(seed_table(groups, names)))


def _corr(c: float | None) -> str:
    return "n/a (no spread)" if c is None else f"{c:+.2f}"


def seed_table(groups: dict, names: list[tuple[str, str]]) -> list[str]:
    """Markdown lines: one row per seed that every group of ``names`` ((arch, tag) keys of
    :func:`seed_groups`) has, over the context lengths all of them have: each group's perplexity at the
    shortest and the longest, its change over the last step (as :func:`last_step_change`), and the
    first group against the second at the shortest and the longest (ratio - 1)."""
    sel = [groups[n] for n in names]
    seeds = sorted(set.intersection(*(set(g) for g in sel)))
    lengths = sorted(set.intersection(*(set(g[s]) for g in sel for s in seeds))) if seeds else []
    if len(lengths) < 2:
        return [f"(no seed and two context lengths common to {', '.join('-'.join(n) for n in names)})"]
    lo, prev, hi = lengths[0], lengths[-2], lengths[-1]
    label = ["-".join(n) for n in names]
    head = ["seed"] + [f"{x}: {lo} / {hi}" for x in label] + [f"{x}: {prev} -> {hi}" for x in label]
    head += [f"{label[0]} vs {label[1]}: {lo} / {hi}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in seeds:
        cells = [str(s)] + [f"{g[s][lo]:.2f} / {g[s][hi]:.2f}" for g in sel]
        cells += [f"{g[s][hi] / g[s][prev] - 1:+.2%}" for g in sel]
        a, b = sel[0][s], sel[1][s]
        cells += [f"{a[lo] / b[lo] - 1:+.1%} / {a[hi] / b[hi] - 1:+.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def last_step_change(seeds: dict[int, dict[int, float]]) -> tuple[int, int, list[float]]:
    """The two longest context lengths every seed has and each seed's perplexity change between them
    (ppl at the longest / at the one before - 1): does a group rise at the end, and do all its seeds?"""
    lengths = sorted(set.intersection(*(set(v) for v in seeds.values())))
    if len(lengths) < 2:
        return 0, 0, []
    lo, hi = lengths[-2:]
    return lo, hi, [v[hi] / v[lo] - 1 for _, v in sorted(seeds.items())]


def _common(a: dict[int, dict[int, float]], b: dict[int, dict[int, float]]) -> tuple[list[int], list[int]]:
    """The seeds two groups share and the context lengths every one of them has in both, sorted."""
    seeds = sorted(set(a) & set(b))
    lengths = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))) if seeds else []
    return seeds, lengths


def paired_comparison(a: dict[int, dict[int, float]], b: dict[int, dict[int, float]]) -> list[dict]:
    """Seed group ``a`` against ``b`` seed by seed ({seed: {context_length: ppl}}, from :func:`seed_groups`),
    over the seeds and lengths both have: ``diff`` = exp(mean log(a / b)) - 1, ``se`` its standard error
    (of the mean of the per-seed log ratios), ``median_diff``. Pairing removes what a seed does to both
    (its data order), which matters when the seed-to-seed spread is wider than the effect."""
    seeds, lengths = _common(a, b)
    if len(seeds) < 2:
        return []
    rows = []
    for n in lengths:
        d = [math.log(a[s][n] / b[s][n]) for s in seeds]
        rows.append(dict(context_length=n, seeds=len(seeds), diff=math.exp(statistics.mean(d)) - 1,
                         se=statistics.stdev(d) / math.sqrt(len(d)), median_diff=math.exp(statistics.median(d)) - 1))
    return rows


def paired_spread(a: dict[int, dict[int, float]], b: dict[int, dict[int, float]]) -> dict | None:
    """Where a paired difference comes from, at the shortest length both groups' common seeds have: each
    group's seed spread (``sd_a``, ``sd_b``: standard deviation of log perplexity) and the correlation of
    the per-seed log ratio log(a / b) with each group's log perplexity (``corr_a``, ``corr_b``). A gap that
    follows b's perplexity far more than a's is made by b's seeds: by how unevenly b trains, more than
    by what a does. None with fewer than three common seeds or a ratio the same in every seed; a
    correlation is None for a group without spread."""
    seeds, lengths = _common(a, b)
    if len(seeds) < 3 or not lengths:
        return None
    n = lengths[0]
    la, lb = [math.log(a[s][n]) for s in seeds], [math.log(b[s][n]) for s in seeds]
    d = [x - y for x, y in zip(la, lb)]
    if statistics.stdev(d) == 0:
        return None
    corr = lambda x: statistics.correlation(d, x) if statistics.stdev(x) > 0 else None  # noqa: E731
    return dict(context_length=n, seeds=len(seeds), sd_a=statistics.stdev(la), sd_b=statistics.stdev(lb),
                corr_a=corr(la), corr_b=corr(lb))


def seed_groups(ppl: list[dict]) -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """Models named ARCH-sSEED-TAG (`reproduce.sh STAGE=pretrain SEEDS=...`, then `ppl-fixed` with
    NAME_TAG): {(arch, tag): {seed: {context_length: ppl}}}, groups of two seeds or more only."""
    groups: dict = {}
    for r in ppl:
        m = re.fullmatch(r"([a-z]+)-s(\d+)-(.+)", r["model"])
        if m:
            groups.setdefault((m[1], m[3]), {}).setdefault(int(m[2]), {})[r["context_length"]] = r["ppl"]
    return {k: v for k, v in groups.items() if len(v) >= 2}


def seed_comparison(groups: dict, versus: dict | None = None) -> list[dict]:
    """DRT against the sliding window per tag and length, from :func:`seed_groups`: the geometric means
    of both, ``diff`` = their ratio - 1, ``se``: one standard error of the difference of the mean
    log-perplexities (seeds independent), ``median_diff``: the ratio of the medians - 1. ``versus``
    maps a DRT tag to the sliding window's tag to compare it with (default: the same tag)."""
    versus = versus or {}
    rows = []
    for (arch, tag), drt in sorted(groups.items()):
        swa_tag = versus.get(tag, tag)
        swa = groups.get(("swa", swa_tag))
        if arch != "drt" or swa is None:
            continue
        for n in sorted(set.intersection(*(set(v) for v in (*drt.values(), *swa.values())))):
            a, b = [math.log(v[n]) for v in drt.values()], [math.log(v[n]) for v in swa.values()]
            se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
            rows.append(dict(tag=tag, swa_tag=swa_tag, context_length=n, seeds=(len(a), len(b)), drt=math.exp(statistics.mean(a)),
                             swa=math.exp(statistics.mean(b)), diff=math.exp(statistics.mean(a) - statistics.mean(b)) - 1,
                             se=se, median_diff=math.exp(statistics.median(a) - statistics.median(b)) - 1))
    return rows


def _seed_plot(ppl: list[dict], out: str, plt, versus: dict | None = None, name: str = "ppl_seeds.png",
               tags: list[str] | None = None) -> None:
    """OUT/NAME: each seed's perplexity (thin) and the geometric mean over seeds (thick) per group
    (the groups of ``tags``, default all); right, DRT over the sliding window (ratio of the geometric
    means, +- one standard error of the difference of mean log-perplexities), for every tag that has both."""
    groups = {k: v for k, v in seed_groups(ppl).items() if tags is None or k[1] in tags or (
        k[0] == "swa" and any((versus or {}).get(t) == k[1] for t in tags))}  # and the windows they are compared with
    if not groups:
        print(f"{name}: no seed group {'tagged ' + ', '.join(tags) if tags else '(models named ARCH-sSEED-TAG)'} in ppl.json")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # one colour per group, the same in both panels: DRT tags blue, green, red, ...; the window's tags
    # orange, olive, brown; full attention gray
    order = {arch: sorted(t for a, t in groups if a == arch) for arch in ("drt", "swa")}
    palette = {"drt": ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:pink", "tab:cyan"],
               "swa": ["tab:orange", "tab:olive", "tab:brown", "goldenrod"]}
    color_of = lambda arch, tag: (palette[arch][order[arch].index(tag) % len(palette[arch])]
                                  if arch in palette else "tab:gray")
    for (arch, tag), seeds in sorted(groups.items()):
        lengths = sorted(set.intersection(*(set(v) for v in seeds.values())))
        ls = "--" if arch != "drt" else "-"
        for v in seeds.values():
            axes[0].plot(lengths, [v[n] for n in lengths], color=color_of(arch, tag), linestyle=ls, lw=0.8, alpha=0.5)
        lg = {n: [math.log(v[n]) for v in seeds.values()] for n in lengths}
        axes[0].plot(lengths, [math.exp(statistics.mean(lg[n])) for n in lengths], color=color_of(arch, tag),
                     linestyle=ls, lw=2.5, marker="o", label=f"{arch}-{tag}: geometric mean of {len(seeds)} seeds")
    axes[0].set(xscale="log", xlabel="context length (tokens)", ylabel="perplexity", title="perplexity by seed")
    axes[0].legend(fontsize=8)
    comparison = seed_comparison(groups, versus)
    for tag in sorted({r["tag"] for r in comparison}):
        rs = [r for r in comparison if r["tag"] == tag]
        lengths, d = [r["context_length"] for r in rs], [math.log1p(r["diff"]) for r in rs]
        vs = f" vs {rs[0]['swa_tag']}" if rs[0]["swa_tag"] != tag else ""
        color = color_of("drt", tag)
        axes[1].plot(lengths, [100 * r["diff"] for r in rs], marker="o", color=color, label=f"drt / swa - 1 ({tag}{vs})")
        axes[1].fill_between(lengths, [100 * (math.exp(x - r["se"]) - 1) for x, r in zip(d, rs)],
                             [100 * (math.exp(x + r["se"]) - 1) for x, r in zip(d, rs)], color=color, alpha=0.2)
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].axhline(-4, color="tab:red", lw=0.8, linestyle=":", label="goal: 4% below")
    axes[1].set(xscale="log", xlabel="context length (tokens)", ylabel="perplexity difference (%)",
                title="DRT vs sliding window, band: +- 1 standard error")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=120)
    plt.close(fig)


def _plots(ppl: list[dict], tasks: list[dict], out: str, versus: dict | None = None,
           seed_plots: dict[str, list[str]] | None = None, tasks_plots: dict[str, list[str]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the models trained with several seeds have their own figures (seed_plots); the others share one
    in_groups = {f"{arch}-s{s}-{tag}" for (arch, tag), seeds in seed_groups(ppl).items() for s in seeds}
    single = [r for r in ppl if r["model"] not in in_groups]
    models = sorted({r["model"] for r in single + tasks})
    cmap = plt.get_cmap("tab20")
    color = {m: cmap(i % 20) for i, m in enumerate(models)}  # one colour per model in every panel
    style = lambda m: "--" if m.startswith(("swa", "full")) else "-"  # baselines dashed
    if single:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for m in sorted({r["model"] for r in single}):
            rs = sorted((r for r in single if r["model"] == m), key=lambda r: r["context_length"])
            for ax in axes:
                ax.plot([r["context_length"] for r in rs], [r["ppl"] for r in rs],
                        marker="s" if "targets" in rs[0] else "o", color=color[m], linestyle=style(m),
                        label=m + (" (same text at every length)" if "targets" in rs[0] else ""))
        # left, log y: every model, a baseline that breaks beyond its training length too; right: the
        # models that do not break, on a linear scale where a few percent can be seen
        axes[0].set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity",
                    title="perplexity vs context length")
        # (over the finite values: a NaN or inf row is left out of the limits; a model whose worst value is
        # within 3x the lowest perplexity is kept, and the model with the lowest worst value always is)
        finite = [r for r in single if math.isfinite(r["ppl"])]
        worst: dict[str, float] = {}
        for r in finite:
            worst[r["model"]] = max(worst.get(r["model"], 0.0), r["ppl"])
        top = max(3.0 * min(r["ppl"] for r in finite), min(worst.values())) if finite else 0.0
        kept = [r["ppl"] for r in finite if worst[r["model"]] <= top]
        axes[1].set(xscale="log", xlabel="context length (tokens)", ylabel="perplexity",
                    title="zoom: the models that do not break")
        if kept:
            axes[1].set_ylim(min(kept) * 0.95, max(kept) * 1.03)
        axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "ppl_vs_length.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)
    for name, tags in (seed_plots or {"ppl_seeds.png": None}).items():
        _seed_plot(ppl, out, plt, versus, name, tags)
    if tasks:
        _tasks_figure(tasks, os.path.join(out, "passkey_vs_length.png"), plt, color, style)
    for name, wanted in (tasks_plots or {}).items():
        missing = [m for m in wanted if not any(r["model"] == m for r in tasks)]
        if missing:
            print(f"{name}: no passkey.json rows of {', '.join(missing)}" + ("" if len(missing) < len(wanted) else "; not drawn"))
        rows = [r for r in tasks if r["model"] in wanted]
        if rows:  # a few models: colours of their own, in the order given
            own = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(wanted)}
            _tasks_figure(rows, os.path.join(out, name), plt, own, style)


def _tasks_figure(tasks: list[dict], path: str, plt, color: dict, style) -> None:
    """Accuracy against context length, one panel a task, one line a model (colours shared with the other figures)."""
    kinds = sorted({r["task"] for r in tasks})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, t in zip(axes[0], kinds):
        for m in sorted({r["model"] for r in tasks if r["task"] == t}):
            rs = sorted((r for r in tasks if r["model"] == m and r["task"] == t), key=lambda r: r["context_length"])
            ax.plot([r["context_length"] for r in rs], [100 * r["accuracy"] for r in rs], marker="o", label=m,
                    color=color[m], linestyle=style(m))
        if t == "2hop":  # the two question forms are different tasks: the chain's lines solid, the end point's dotted
            for line in ax.get_lines():
                rs = [r for r in tasks if r["model"] == line.get_label() and r["task"] == t]
                if rs and rs[0].get("hop_answer", "end") == "end":
                    line.set_linestyle(":")
            t = "2hop (solid: asks for the chain Y, Z; dotted: the end point Z)"
        ax.set(xscale="log", ylim=(-2, 102), xlabel="context length (tokens)", ylabel="accuracy (%)", title=t)
    # one legend for all panels, beside them: inside, it covers the lines near 100%
    shown = {}
    for ax in reversed(axes[0]):  # handles from the single / multikey panels first (their line styles)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            shown.setdefault(lab, h)
    labels = sorted(shown)
    fig.legend([shown[lab] for lab in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except ResultsError as e:
        sys.exit(f"collect_results: error: {e}")
