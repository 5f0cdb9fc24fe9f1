"""The ``gca eval``, ``gca plot``, ``gca generate`` and ``gca bench`` commands."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import torch

from gca.cli import device_arg, int_at_least
from gca.eval import strict_rows

_FMT = argparse.RawDescriptionHelpFormatter


def parse_lengths(text: str, train_length: int | None) -> list[int]:
    """``"1x,4x,16x"`` (multiples of the training length), ``"4096,64K,16M"`` (tokens). Each must come to
    a whole number of tokens (``100.7`` and ``0.3x`` of 504 are refused, not cut down); the arithmetic is
    exact, so ``0.29x`` of 100 is 29, not 28."""
    out = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([xXkKmM]?)", part)
        if not m:
            raise ValueError(f"bad length {part!r}: use e.g. 4x, 4096, 64K or 16M")
        v, unit = Fraction(m.group(1)), m.group(2).lower()
        if unit == "x":
            if not train_length:
                raise ValueError("lengths like 4x need the training length: pass --train-length")
            n = v * train_length
            what = f"{part} of the training length {train_length} is {float(n):g} tokens"
        else:
            n = v * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]
            what = f"{part} is {float(n):g} tokens" if unit else f"{part} tokens"
        if n.denominator != 1:
            raise ValueError(f"bad length {part!r}: {what}, not a whole number; give a whole number of tokens "
                             f"(e.g. {max(1, round(n))})")
        out.append(int(n))
        if out[-1] < 1:
            raise ValueError(f"bad length {part!r}: a context needs at least one token")
    return out


def _times(n: int, train_length: int | None) -> str:
    """``n`` tokens as a multiple of the training length, for the tables: ``4x``, ``0.5x``, ``1.5x``
    (two decimals below 10x, whole numbers above, one significant digit below 0.01x: ``0.004x``, not
    ``0x``); ``-`` without a training length."""
    if not train_length:
        return "-"
    r = n / train_length
    if r < 0.01:  # (two decimals would make it 0x)
        return f"{r:.1g}x"
    return f"{r:.0f}x" if r >= 10 else f"{round(r, 2):g}x"


def _fmt_ppl(ppl: float) -> str:
    """A perplexity for the terminal: three decimals, or 4 significant digits from 1e6 up (an untrained
    model's 1.98e+18, not 1980169070461008128.000)."""
    return f"{ppl:.3f}" if ppl < 1e6 else f"{ppl:.4g}"


def model_name(ckpt: str) -> str:
    """The name a checkpoint's results are recorded under: its run folder's (``runs/t1`` and
    ``runs/t1/ckpt`` are both ``t1``)."""
    p = Path(os.path.abspath(ckpt))
    return p.parent.name if p.name == "ckpt" else p.name


def out_file(out: str, default_name: str) -> Path:
    """The file a one-file ``--out`` names: a folder (one that exists, or any path ending in ``/``) gets
    ``default_name`` inside it. Its folder is made now, so that a bad path fails before the work,
    not after it."""
    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        path = path / default_name
    if path.is_dir():
        raise ValueError(f"--out {out}: {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"--out {out}: a file stands where its folder should be; give another path") from None
    return path


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_eval(ckpt: str, device: str, dtype: str):
    """(model, train_length, tokenizer-or-None) from a run folder or checkpoint folder."""
    from gca.train.checkpoint import load_model

    dev = _device(device)
    model = load_model(ckpt, device=dev)
    if dtype != "float32":
        model = model.to({"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    root = Path(ckpt)
    ck = root / "ckpt" if (root / "ckpt").is_dir() else root
    train_length = None
    tc = ck / "train_config.json"
    if tc.exists():
        from gca.train.checkpoint import _corrupt, _read_json

        d = _read_json(tc, ck)  # (a file that is not JSON is named in the error)
        train_length = d.get("seq_len") if isinstance(d, dict) else None
        if not isinstance(d, dict) or not (train_length is None or type(train_length) is int and train_length > 0):
            raise _corrupt(tc, f"does not hold a training config with a valid seq_len (got {train_length!r})", ck)
    tok = None
    if (ck / "tokenizer.json").exists():
        from gca.data.tokenizer import load_tokenizer

        tok = load_tokenizer(str(ck / "tokenizer.json"))
    return model.eval(), train_length, tok


def check_data_tokenizer(tok, folder, option: str) -> None:
    """Refuse a prepared ``folder`` (``--data``, ``--filler``) whose tokenizer is not the checkpoint's
    ``tok``: its ids would be read as other words, and the numbers would mean nothing. Nothing to
    compare when either has none (a checkpoint without tokenizer.json, a folder of another kind)."""
    if tok is None or not (Path(folder) / "tokenizer.json").is_file():
        return
    from gca.data.tokenizer import load_tokenizer

    theirs = load_tokenizer(folder)
    try:
        same = theirs.to_json() == tok.to_json()
    except ValueError:  # (a tokenizer without a tokenizers backend: nothing to compare)
        return
    if not same:
        raise ValueError(f"{option} {folder} was prepared with another tokenizer ({theirs.name}, {theirs.vocab_size} ids) "
                         f"than the checkpoint's tokenizer.json ({tok.vocab_size} ids): its ids would be read as other "
                         f"words; prepare the text with the checkpoint's tokenizer (gca prepare ... --tokenizer "
                         f"CKPT/tokenizer.json)")


MISSES_SHOWN = 10  # wrong trials printed under the table (tasks.json has every one)


def _print_table(rows: list[dict], train_length: int | None) -> None:
    from gca.eval.tasks import summarize, summarize_beyond_window

    acc, hit = summarize(rows, "accuracy"), summarize(rows, "retrieval_hit")
    dis = summarize([r for r in rows if r.get("distractor_answer") is not None], "distractor_answer")
    hop1 = summarize([r for r in rows if r.get("first_hop") is not None], "first_hop")  # 2hop asked for the chain
    far = summarize_beyond_window(rows)
    print(f"{'task':<10} {'length':>10} {'x train':>8} {'accuracy':>9} {'retrieval hit':>14} {'distractor':>11} "
          f"{'beyond window':>20}" + (f" {'first hop':>10}" if hop1 else ""))
    for (task, n), a in acc.items():
        x = _times(n, train_length)
        fa, fn = far.get((task, n), (None, 0))
        f = f"{100 * fa:.1f}% of {fn}" if fn else "-"
        d = f"{100 * dis[(task, n)]:.1f}%" if (task, n) in dis else "-"
        rh = f"{100 * hit[(task, n)]:.1f}%" if (task, n) in hit else "-"  # absent: a model without retrieval
        h = (f" {100 * hop1[(task, n)]:>9.1f}%" if (task, n) in hop1 else f" {'-':>10}") if hop1 else ""
        print(f"{task:<10} {n:>10} {x:>8} {100 * a:>8.1f}% {rh:>14} {d:>11} {f:>20}{h}")
    misses = [(r, m) for r in rows for m in r.get("misses", [])]
    for r, m in misses[:MISSES_SHOWN]:
        got = m.get("needle_retrieved")
        print(f"miss: {r['task']} {r['context_length']} depth {r['depth']} trial {m['trial']}: answer {m['answer']!r}, "
              f"wrote {m['output']!r}" + ("" if got is None else f" (needle {'retrieved' if got else 'not retrieved'})"))
    if len(misses) > MISSES_SHOWN:
        print(f"... and {len(misses) - MISSES_SHOWN} more misses (all in tasks.json)")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")  # (two evaluations into one folder: one temp file each)
    tmp.write_text(text)
    tmp.replace(path)


def _read_results(path: Path) -> list[dict]:
    """The rows of an earlier ``gca eval``'s ``tasks.json`` / ``ppl.json`` (none when there is no file). A file
    that is not a JSON list of rows is refused, not overwritten."""
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except ValueError:
        rows = None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} is not a list of gca eval rows, so its rows cannot be kept beside this model's: "
                         f"move it away or give another --out")
    return rows


def _row_key(row: dict) -> tuple:
    """What one measurement is of: the model, the task (``tasks.json``) or the corpus (``ppl.json``), the
    context length, and for 2hop the form of its question. A new evaluation replaces an earlier file's rows
    of the same keys and keeps every other row."""
    return (row.get("model"), row.get("task"), row.get("hop_answer"), row.get("hop_lead") or None, row.get("corpus"),
            row.get("context_length"))


def _kept_rows(path: Path, keys: set[tuple], snapshot: list[dict] | None = None) -> list[dict]:
    """The rows of ``path`` that this evaluation does not measure again (``keys``, by :func:`_row_key`): other
    models' rows (the default ``--out`` is shared by every model) and this model's rows of other tasks, corpora
    or lengths. Read afresh at each write, so that evaluations of other models into the same folder keep each
    other's rows; a file that has become unreadable meanwhile gives ``snapshot`` (the rows read when the
    evaluation began)."""
    try:
        rows = _read_results(path)
    except (ValueError, OSError):
        if snapshot is None:
            raise
        rows = snapshot
    return [r for r in rows if _row_key(r) not in keys]


def _strict_text(rows: list[dict]) -> str:
    return json.dumps(strict_rows(rows), indent=1, allow_nan=False)  # (no Infinity / NaN: gca.eval.strict_rows)


def _model_names(rows: list[dict]) -> str:
    names = sorted({str(r["model"]) if r.get("model") is not None else "(unnamed)" for r in rows})
    return ", ".join(names)


def cmd_eval(args: argparse.Namespace) -> int:
    from gca.eval.plots import plot_accuracy_vs_length, plot_heatmap, plot_ppl_vs_length

    if args.what == "ppl" and not args.data:  # before the model loads
        raise ValueError("ppl needs --data DIR (a folder written by `gca prepare`; its val split is scored)")
    out = Path(args.out)
    results = out / ("tasks.json" if args.what == "tasks" else "ppl.json")
    if out.exists() and not out.is_dir():  # before the model loads
        raise ValueError(f"--out {args.out} is a file: give a folder (eval {args.what} writes "
                         f"{results.name} and its plots into it)")
    name = args.name or model_name(args.ckpt)
    # rows already in --out (its default, ./eval, is every model's) are kept, but for those this evaluation measures
    # again: the same model, task or corpus, and length (known once the training length is)
    earlier = _read_results(results)  # (a file that is not a list of rows is refused now, before the work)
    model, train_length, tok = load_for_eval(args.ckpt, args.device, args.dtype)
    train_length = args.train_length or train_length
    lengths = parse_lengths(args.lengths, train_length)
    if args.what == "tasks":
        from gca.data.tasks import canonical_kind

        tasks = [canonical_kind(t.strip()) for t in args.tasks.split(",")]  # a bad name fails here, before any trial
        hop = dict(hop_answer=args.hop_answer or "chain", hop_lead=args.hop_lead or None)
        keys = {_row_key(dict(model=name, task=t, context_length=L, **(hop if t == "2hop" else {})))
                for t in tasks for L in lengths}
    else:
        keys = {_row_key(dict(model=name, corpus=str(args.data), context_length=L)) for L in lengths}
    kept = [r for r in earlier if _row_key(r) not in keys]
    if kept:
        own = [r for r in kept if r.get("model") == name]
        others = [r for r in kept if r.get("model") != name]
        said = ([f"rows of other models ({_model_names(others)})"] if others else []) + (
            [f"{len(own)} row(s) of {name} at other {'tasks' if args.what == 'tasks' else 'corpora'} or lengths"]
            if own else [])
        drawn = ("the plots show this evaluation's alone" if args.what == "tasks"
                 else "ppl_vs_length.png draws every row")
        print(f"note: {results} holds {' and '.join(said)}: they are kept beside what this evaluation measures "
              f"(rows of the same model, {'task' if args.what == 'tasks' else 'corpus'} and length are replaced), "
              f"and {drawn}")
    folder, option = (args.filler, "--filler") if args.what == "tasks" else (args.data, "--data")
    if folder is not None:
        check_data_tokenizer(tok, folder, option)
    if args.what == "tasks" and args.filler is not None and (Path(args.filler) / "meta.json").is_file():
        from gca.eval.perplexity import open_val_split

        # an empty or corrupt val split, said in eval's terms before any trial
        open_val_split(args.filler, use="gca eval tasks draws its filler text from that split",
                       alternative="leave out --filler (random words)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    saved = []  # the rows written so far (what an interrupted evaluation keeps)
    if args.what == "tasks":
        from gca.eval.tasks import evaluate_tasks

        hop_flags = [f for f, given in (("--hop-answer", args.hop_answer is not None), ("--hop-lead", args.hop_lead))
                     if given]
        if hop_flags and "2hop" not in tasks:  # (they were ignored without a word)
            warnings.warn(f"{', '.join(hop_flags)} only apply to the 2hop task, and --tasks {args.tasks} does not "
                          f"hold it: ignored")
        if tok is None and args.filler is None:  # (with --filler, the filler folder's tokenizer writes the needles)
            from gca.data.tokenizer import load_tokenizer

            vocab = load_tokenizer("embedded").vocab_size
            if vocab > model.config.vocab_size:
                raise ValueError(f"{args.ckpt} has no tokenizer.json, and the embedded tokenizer's {vocab} ids do not "
                                 f"fit the model's vocabulary of {model.config.vocab_size}: copy the tokenizer.json of "
                                 f"the data it was trained on into its checkpoint folder, or pass that data as --filler")
            warnings.warn(f"{args.ckpt} has no tokenizer.json: the task prompts use the embedded tokenizer (right for a "
                          f"model trained on synthetic data or on a folder prepared with the default tokenizer)")

        # what a row must share with this evaluation for --resume to keep it (each row records them)
        stamp = dict(model=name, train_length=train_length, filler=None if args.filler is None else str(args.filler),
                     dtype=args.dtype)
        done = _resumable(earlier, keys, stamp, args, results, tasks, lengths) if args.resume else []
        # the trials of an unfinished cell, saved after each batch (one entry a cell in progress; evaluations of
        # other models or tasks into the same folder keep theirs)
        partial_path = out / "tasks.partial.json"
        options = dict(hop_answer=args.hop_answer or "chain", hop_lead=args.hop_lead or None)
        partial = _resumable_partial(partial_path, stamp, options, args, tasks, lengths, done) if args.resume else []
        in_cell = []  # the trials saved of the cell in progress

        def save(rows):  # after each (task, length, depth): a stopped run keeps what it measured
            saved[:] = rows
            mine = [dict(r, **stamp) for r in rows]
            _atomic_write(results, _strict_text(_kept_rows(results, keys, earlier) + mine))
            _write_partial(partial_path, dict(rows[-1], **stamp, options=options), None)
            in_cell.clear()

        def save_batch(state):  # after each batch of a cell with trials left
            entry = dict(state, **stamp, options=options)
            _write_partial(partial_path, entry, entry)
            in_cell[:] = [state["done"]]

        try:
            rows = evaluate_tasks(model, tasks, lengths, args.depths, args.trials, seed=args.seed,
                                  tokenizer=tok, filler=args.filler, batch_size=args.batch_size,
                                  offload=args.offload, prefill_chunk=args.prefill_chunk, on_row=save, done=done,
                                  on_batch=save_batch, partial=partial, hop_answer=args.hop_answer or "chain",
                                  **({"hop_lead": args.hop_lead} if args.hop_lead else {}))
        except KeyboardInterrupt:
            more = f"{in_cell[0]} trial(s) of the cell in progress in {partial_path}" if in_cell else ""
            return _interrupted(results, len(saved), "(task, length, depth) cell(s)",
                                "rerun the same command with --resume to measure the rest", more=more)
        for r in rows:
            r.update(stamp)
        _print_table(rows, train_length)
        # (the plots draw one model: this one's rows, whatever else tasks.json holds)
        plot_accuracy_vs_length(rows, str(out / "accuracy_vs_length.png"), train_length=train_length)
        if any(r["retrieval_hit"] is not None for r in rows):  # None: a baseline without retrieval
            plot_accuracy_vs_length(rows, str(out / "retrieval_vs_length.png"), key="retrieval_hit", train_length=train_length)
        for task in tasks:
            plot_heatmap(rows, str(out / f"heatmap_{task}.png"), task=task)
    else:
        from gca.eval.perplexity import longest_document, perplexity_vs_length

        targets = parse_lengths(args.targets, train_length) if args.targets else None
        if targets is not None and len(targets) != 1:
            raise ValueError(f"--targets {args.targets}: give one length (the tokens scored at the end of every window)")
        targets = targets[0] if targets else None

        def tag(rows):
            return [dict(r, model=name, train_length=train_length, corpus=str(args.data)) for r in rows]

        def save_rows(rows):  # after each length, so a stopped evaluation keeps its shorter lengths
            saved[:] = rows
            _atomic_write(results, _strict_text(_kept_rows(results, keys, earlier) + tag(rows)))

        try:
            rows = tag(perplexity_vs_length(model, args.data, lengths, args.windows, seed=args.seed, offload=args.offload,
                                            targets=targets, on_row=save_rows))
        except KeyboardInterrupt:
            return _interrupted(results, len(saved), "length(s)")
        for r in rows:
            x = f" ({_times(r['context_length'], train_length)})" if train_length else ""
            what = f"the same {r['tokens']} tokens (the last {r['targets']} of each window)" if targets else f"{r['tokens']} tokens"
            print(f"context {r['context_length']:>10}{x}: ppl {_fmt_ppl(r['ppl'])} over {what}")
        bad = [r["context_length"] for r in rows if not math.isfinite(r["ppl"])]
        if bad:
            print(f"warning: the perplexity is not finite at context {', '.join(map(str, bad))} (NaN: a NaN in the model's "
                  f"outputs; inf: a mean loss past ~710 nats): check the checkpoint (a diverged run?) and --dtype",
                  file=sys.stderr)
        # every model's line (ppl.json keeps the others'): models scored on other text are named with their corpus,
        # and the training length is marked only when all share it
        drawn = _kept_rows(results, keys, earlier) + rows
        corpora = {r.get("corpus") for r in drawn}
        if len(corpora) > 1:
            drawn = [dict(r, model=f"{r.get('model')} on {r.get('corpus')}") for r in drawn]
        shared = {r.get("train_length") for r in drawn} <= {train_length, None}
        plot_ppl_vs_length(drawn, str(out / "ppl_vs_length.png"), train_length=train_length if shared else None)
        longest = longest_document(args.data)
        if longest and max(lengths) > longest:
            print(f"note: the longest held-out document has {longest} tokens, so contexts longer than that hold other "
                  f"documents too: beyond it, perplexity measures what reading unrelated text costs, not length alone "
                  f"(scripts/retrieval_documents.py shows where retrieval goes)")
    print(f"wrote {out} in {time.time() - t0:.0f}s")
    return 0


def depths_arg(text: str) -> int | list[float]:
    """An argparse ``type`` for ``--depths``: a count (``5``: evenly spaced in [0, 1]) or a comma-separated list of
    relative depths (``0,0.5,1``), each in [0, 1] and none twice."""
    if "," not in text and "." not in text:
        return int_at_least(1)(text)
    try:
        out = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a comma-separated list of depths in [0, 1], "
                                         f"got {text!r}") from None
    bad = [d for d in out if not 0.0 <= d <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"depths are relative positions in [0, 1], got {bad[0]:g} in {text!r}")
    if len({round(d, 4) for d in out}) < len(out):
        raise argparse.ArgumentTypeError(f"a depth is given twice in {text!r}")
    return out


def _grid_depths(args) -> list[float]:
    from gca.eval.tasks import _depth_list

    return [round(d, 4) for d in _depth_list(args.depths)]


def _same_cell(r: dict, stamp: dict, args, tasks: list[str], lengths: list[int]) -> bool:
    """Whether a saved row (or unfinished cell) of ``gca eval tasks`` is this evaluation's: the same ``stamp`` (model,
    training length, filler, dtype), seed and trials, and the same [task, length, depth] place in this run's grid
    (part of its trials' seed)."""
    depths = _grid_depths(args)
    if r.get("task") not in tasks or r.get("context_length") not in lengths or r.get("depth") not in depths:
        return False
    want = dict(stamp, seed=args.seed, trials=args.trials)
    cell = [tasks.index(r["task"]), lengths.index(r["context_length"]), depths.index(r["depth"])]
    return all(r.get(k) == v for k, v in want.items()) and r.get("cell") == cell


def _resumable(earlier: list[dict], keys: set[tuple], stamp: dict, args, results: Path, tasks: list[str],
               lengths: list[int]) -> list[dict]:
    """``gca eval tasks --resume``: the rows of ``results`` (read as ``earlier``) that this evaluation would measure
    again with the same outcome: this model's task and length (``keys``), the same cell of this run's grid (task,
    length and depth at the same places of ``--tasks``, ``--lengths`` and the depths: the cell's seed), and the same
    seed, trials, filler, dtype and training length (``stamp``). Says how many it keeps and why others are not."""
    same = [r for r in earlier if _row_key(r) in keys]
    done = [r for r in same if _same_cell(r, stamp, args, tasks, lengths)]
    n_cells = len(tasks) * len(lengths) * len(_grid_depths(args))
    print(f"resume: {len(done)} of the {n_cells} (task, length, depth) cells are in "
          f"{results}: kept; measuring the rest")
    if len(same) > len(done):
        print(f"resume: {len(same) - len(done)} other row(s) of {stamp['model']} at these tasks and lengths are not "
              f"kept (another seed, --trials, --filler, --dtype, training length, depth or order of --tasks / "
              f"--lengths / depths, or written before rows recorded them): measured again")
    return done


def _partial_key(state: dict) -> tuple:
    """The cell an entry of ``tasks.partial.json`` is of: model, task, length, depth and the task's options."""
    opts = state.get("options") or {}
    return (state.get("model"), state.get("task"), state.get("context_length"), state.get("depth"),
            opts.get("hop_answer"), opts.get("hop_lead"))


def _read_partial(path: Path) -> list[dict]:
    """The entries of ``tasks.partial.json`` (none when it is missing or unreadable: it only saves time)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _write_partial(path: Path, cell: dict, state: dict | None) -> None:
    """Replace ``cell``'s entry of ``tasks.partial.json`` by ``state`` (None: drop it; the file goes with its
    last entry). Read afresh at each write, like ``tasks.json``, so that other evaluations' entries stay."""
    others = [e for e in _read_partial(path) if _partial_key(e) != _partial_key(cell)]
    if state is not None or others:
        _atomic_write(path, json.dumps(others + ([state] if state is not None else []), indent=1))
    elif path.exists():
        path.unlink(missing_ok=True)


def _resumable_partial(path: Path, stamp: dict, options: dict, args, tasks: list[str], lengths: list[int],
                       done: list[dict]) -> list[dict]:
    """``gca eval tasks --resume``: the unfinished cells of ``tasks.partial.json`` that this evaluation can go on
    from: this model and task options, the same seed, trials, filler, dtype and training length, a cell of this
    run's grid at the same place, no finished row for it, and its per-trial lists whole."""
    from gca.eval.tasks import partial_state_whole

    entries = _read_partial(path)
    if not entries:
        if path.exists():
            print(f"resume: {path} is not a list of saved cells (cut short or edited?): its trials are measured again")
        return []
    finished = {(r["task"], r["context_length"], r["depth"]) for r in done}

    def fits(e):
        return (_same_cell(e, stamp, args, tasks, lengths) and (e.get("options") or {}) == options
                and (e["task"], e["context_length"], e["depth"]) not in finished and partial_state_whole(e, args.trials))

    keep = [{k: v for k, v in e.items() if k not in stamp and k != "options"} for e in entries if fits(e)]
    mine = [e for e in entries if e.get("model") == stamp["model"]]
    if keep:
        print(f"resume: {sum(e['done'] for e in keep)} trial(s) of {len(keep)} unfinished cell(s) are in {path}: kept")
    if len(mine) > len(keep):
        print(f"resume: {len(mine) - len(keep)} unfinished cell(s) of {stamp['model']} in {path} are not kept (another "
              f"evaluation's grid, seed, --trials, --filler, --dtype or task options, or finished since)")
    return keep


def _interrupted(path: Path, n: int, what: str, hint: str = "", more: str = "") -> int:
    """Ctrl-C during an evaluation: one line saying what the results file kept (no plots are drawn), and
    ``more`` (the trials saved of an unfinished cell); the shell's status for SIGINT."""
    from gca.cli import _close_progress_bars

    _close_progress_bars()
    if n:
        kept = f"{path} keeps the {n} {what} finished" + (f" and {more}" if more else "") + (f": {hint}" if hint else "")
    elif more:
        kept = f"no {what} finished; kept: {more}" + (f"; {hint}" if hint else "")
    else:
        kept = f"nothing was finished ({path} is an earlier evaluation's)" if path.exists() else "nothing was finished"
    print(f"gca eval: interrupted: {kept}", file=sys.stderr)
    return 130


class _EvalSubParser(argparse.ArgumentParser):
    """``gca eval tasks`` and ``gca eval ppl``: a bad option ends in ``gca eval: error: ...``, the prefix
    of every other error of the command (``main()`` names the command, not the subcommand)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog.rsplit(' ', 1)[0]}: error: {message}\n")


_TASKS_EXAMPLES = """\
  gca eval tasks --ckpt runs/tiny --lengths 1x,4x,16x,64x --depths 5 --trials 20 --out runs/tiny/eval
  gca eval tasks --ckpt runs/small --tasks passkey,multikey,2hop --lengths 16K,1M,16M --offload --dtype bfloat16"""
_PPL_EXAMPLES = """\
  gca eval ppl --ckpt runs/small --data data/debian-docs --lengths 1x,4x,16x,64x --windows 4
  gca eval ppl --ckpt runs/small --data data/debian-docs --lengths 1x,4x,16x,64x --windows 16 --targets 1x"""


def add_eval(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)  # the options of both subcommands
    common.add_argument("--ckpt", required=True, help="a run folder (gca train --out) or its ckpt/ folder")
    common.add_argument("--lengths", default="1x,4x,16x,64x",
                        help="context lengths: multiples of the training length (4x, 0.5x) or tokens (4096, 64K, 16M), each "
                             "a whole number of tokens (default 1x,4x,16x,64x)")
    common.add_argument("--train-length", type=int_at_least(1), default=None, help="training length for 'Nx' (default: the checkpoint's --seq-len)")
    common.add_argument("--seed", type=int, default=1234, help="seed of the needle samples (tasks) or of the windows (ppl) (default 1234)")
    common.add_argument("--offload", action="store_true", help="keep the chunk memory in CPU memory")
    common.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the weights' dtype (default float32)")
    common.add_argument("--name", default=None, help="model name in the JSON (default: the run folder's name)")
    common.add_argument("--out", default="eval", help="output folder for JSON and plots (default ./eval)")

    p = sub.add_parser(
        "eval",
        help="needle tasks or perplexity against context length",
        description="Evaluate a checkpoint, streaming so only memory limits the context length. "
                    "`gca eval tasks --help` and `gca eval ppl --help` list each one's options.",
        epilog=f"examples:\n{_TASKS_EXAMPLES}\n{_PPL_EXAMPLES}",
        formatter_class=_FMT,
    )
    what = p.add_subparsers(dest="what", metavar="{tasks,ppl}", required=True, parser_class=_EvalSubParser)
    t = what.add_parser(
        "tasks", parents=[common], formatter_class=_FMT,
        help="passkey / multikey / 2hop accuracy and retrieval hit rate",
        description="Needle-task accuracy over a grid of context lengths x needle depths: tasks.json, "
                    "accuracy_vs_length.png, retrieval_vs_length.png (DRT models) and heatmap_<task>.png in --out.",
        epilog=f"""examples:
{_TASKS_EXAMPLES}

Needle prompts end one token into a fresh chunk (see the README: where the question ends matters);
a trial counts when the greedy continuation is exactly the answer.""",
    )
    t.add_argument("--tasks", default="passkey", help="comma-separated: passkey, multikey, 2hop (default passkey)")
    t.add_argument("--depths", type=depths_arg, default=5,
                   help="needle depths: a count, evenly spaced in [0, 1] (default 5), or relative depths written "
                        "with a comma or a decimal point: 0,0.5,1 (1.0 alone is the one depth 1; 1 is one depth, 0.5)")
    t.add_argument("--hop-lead", type=int_at_least(0), default=0,
                   help="2hop: ask the question so that its X ends at least this many chunks before the answer "
                        "(default 0: the plain question, inside the last chunk; see make_task_sample's hop_lead)")
    t.add_argument("--hop-answer", choices=["chain", "end"], default=None,  # (None: not given, "chain")
                   help="2hop: ask for the chain 'Y , Z' (default; the published task's form) "
                        "or for the end point Z alone ('after two steps'; the form of results before 2026-12-01)")
    t.add_argument("--trials", type=int_at_least(1), default=20, help="trials per length and depth (default 20)")
    t.add_argument("--batch-size", type=int_at_least(1), default=8, help="trials streamed together (default 8)")
    t.add_argument("--filler", default=None, help="filler text: a prepared folder, its val split (default: embedded random words)")
    t.add_argument("--prefill-chunk", type=int_at_least(1), default=None,
                   help="prompt positions processed at once (default 16384 on a GPU, 4096 on a CPU; "
                        "answers do not depend on it)")
    t.add_argument("--resume", action="store_true",
                   help="finish an interrupted evaluation (the same command): keep the (task, length, depth) rows "
                        "that --out's tasks.json holds for this --name, --seed, --trials, --filler, --dtype, training "
                        "length and grid, and the finished trials of a cell in progress (--out's tasks.partial.json, "
                        "saved after each batch), and measure only the rest, which come out as an uninterrupted run's "
                        "(default: measure every cell again)")
    t.set_defaults(func=cmd_eval)
    q = what.add_parser(
        "ppl", parents=[common], formatter_class=_FMT,
        help="perplexity on held-out text",
        description="Perplexity on a prepared folder's val split at each context length: ppl.json and "
                    "ppl_vs_length.png in --out.",
        epilog=f"examples:\n{_PPL_EXAMPLES}",
    )
    q.add_argument("--data", default=None, help="a prepared folder (gca prepare --out); its val split is scored (required)")
    q.add_argument("--windows", type=int_at_least(1), default=4, help="windows per length (default 4)")
    q.add_argument("--targets", default=None, metavar="T",
                   help="hold the text scored fixed: the same windows' last T tokens (e.g. 1x or 4096) at every "
                        "length, only the context before them growing (default: fresh windows per length, all scored)")
    q.set_defaults(func=cmd_eval)


def read_log(path: str) -> list[dict]:
    """The rows of a run's ``log.jsonl`` (``path``: the run folder or the file). A line that does not
    parse (a run killed mid-write) is skipped with a note; a missing or empty log is an error."""
    f = Path(path)
    if f.is_dir():
        f = f / "log.jsonl"
    if not f.is_file():
        raise ValueError(f"{path}: no training log (expected a run folder with log.jsonl, or a .jsonl file)")
    rows, bad = [], 0
    for line in f.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        else:
            bad += 1
    if bad:
        print(f"{f}: skipped {bad} line(s) that are not log rows", file=sys.stderr)
    if not rows:
        raise ValueError(f"{f}: holds no log rows")
    return rows


def _run_log(run: str) -> str:
    """The log file a ``gca plot`` run names (a run folder's ``log.jsonl``, or the file given), as a real
    path: two arguments that give the same one name the same run."""
    return os.path.realpath(os.path.join(run, "log.jsonl") if os.path.isdir(run) else run)


def run_labels(runs: list[str]) -> list[str]:
    """``gca plot``'s default legend labels: a run folder's name (a ``log.jsonl``'s: its folder's; another
    ``.jsonl`` file's: its name without the suffix); runs that would share a label get as many of their
    path's folders as tell them apart (``a/drt``, ``b/drt``), and a file beside a run folder of its name
    keeps its suffix (``runs/drt`` and ``runs/drt.jsonl``: ``drt``, ``drt.jsonl``)."""
    given = [Path(os.path.abspath(r)) for r in runs]
    paths = [p.parent if p.name == "log.jsonl" else p if p.is_dir() else p.with_suffix("") for p in given]
    logs = [_run_log(r) for r in runs]
    # a file named as another run's folder (or as another file but for its suffix) keeps its suffix
    paths = [g if any(q == p and f != logs[i] for q, f in zip(paths, logs)) else p
             for i, (g, p) in enumerate(zip(given, paths))]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p.parts[-d:]) for p, d in zip(paths, depth)]
        grow = [i for i, x in enumerate(labels) if labels.count(x) > 1 and depth[i] < len(paths[i].parts) - 1]
        if not grow:  # (the same run given twice stays doubled: cmd_plot refuses it)
            return labels
        for i in grow:
            depth[i] += 1


def cmd_plot(args: argparse.Namespace) -> int:
    from gca.eval.plots import plot_training_logs

    logs_of = [_run_log(r) for r in args.runs]
    same = [f for i, f in enumerate(logs_of) if f in logs_of[:i]]
    if same:  # one run twice (runs/t1 and ./runs/t1/, or its log.jsonl): two copies of one line
        f = same[0]
        given = [r for r, g in zip(args.runs, logs_of) if g == f]
        run = os.path.dirname(f) if os.path.basename(f) == "log.jsonl" else f
        print(f"gca plot: error: the run {run} is given more than once (as {', '.join(given)}): drop the duplicate",
              file=sys.stderr)
        return 2
    labels = args.labels.split(",") if args.labels else run_labels(args.runs)
    if len(labels) != len(args.runs):
        print(f"gca plot: error: {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:  # (the runs of one label were drawn as one line, the last run read)
        print(f"gca plot: error: --labels names {', '.join(twice)} more than once: give each run its own label",
              file=sys.stderr)
        return 2
    try:
        logs = {label: read_log(run) for label, run in zip(labels, args.runs)}
    except ValueError as e:
        print(f"gca plot: error: {e}", file=sys.stderr)
        return 2
    out = out_file(args.out, "curves.png")
    if not out.suffix:
        out = out.with_suffix(".png")  # what matplotlib would write for a name without one
    print(f"wrote {plot_training_logs(logs, str(out), smooth=args.smooth)}")
    for label, rows in logs.items():
        val = [r for r in rows if "val_loss" in r]
        if val:
            last = val[-1]
            extra = "".join(f", {k[4:]} {last[k]:g}" for k in ("val_retr_spread", "val_retr_top", "val_gca_gain") if k in last)
            print(f"{label}: step {last['step']}: val_loss {last['val_loss']:.4f}{extra}")
    return 0


def add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="training curves of one or more runs, with the retrieval's health",
        description="Training loss, validation loss and (for DRT runs) the retrieval score spread and the GCA gain "
                    "(validation loss with GCA off minus on) of each run, side by side.",
        epilog="""examples:
  gca plot runs/small --out runs/small/curves.png
  gca plot runs/repro/drt runs/repro/swa --labels drt,swa --out curves.png

A retrieval score spread below 0.01 means every retrieved chunk gets the same weight: retrieval
has collapsed (README: "Watch retrieval while training").""",
        formatter_class=_FMT,
    )
    p.add_argument("runs", nargs="+", help="run folders (gca train --out) or log.jsonl files")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per run (default: the folder names; "
                                                 "runs of one name get as much of their paths as tells them apart)")
    p.add_argument("--smooth", type=int_at_least(1), default=5, help="running mean over this many logged training steps (default 5)")
    p.add_argument("--out", default="curves.png",
                   help="the PNG to write; a folder (existing, or ending in /) gets curves.png inside it (default curves.png)")
    p.set_defaults(func=cmd_plot)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt_file:  # before the model loads
        pf = Path(args.prompt_file)
        if pf.is_dir():
            raise ValueError(f"--prompt-file {pf} is a folder: give a text file")
        if not pf.is_file():
            raise FileNotFoundError(f"--prompt-file {pf}: no such file")
        try:
            text = pf.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {pf} is not UTF-8 text ({e.reason} at byte {e.start}): convert it first, "
                             f"e.g. iconv -f latin1 -t utf-8 {pf} > prompt.txt") from None
    else:
        text = args.prompt
    if not text:
        raise ValueError("give a non-empty --prompt or --prompt-file")
    ignored = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None]
    if ignored and not args.do_sample:
        print(f"gca generate: warning: {', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} only with "
              f"--do-sample; decoding is greedy", file=sys.stderr)
    model, _, tok = load_for_eval(args.ckpt, args.device, args.dtype)
    own = tok is not None
    if own and args.tokenizer != "embedded":  # (the default cannot be told from an explicit "embedded")
        print(f"gca generate: warning: --tokenizer {args.tokenizer} is ignored: the checkpoint has its own "
              f"tokenizer.json", file=sys.stderr)
    if not own:
        from gca.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    ids = torch.tensor([tok.encode(text)], dtype=torch.long)
    V = model.config.vocab_size
    if int(ids.max()) >= V:  # (the model's own "input_ids must lie in [0, V)" does not say why)
        fix = ("its tokenizer.json does not match the weights" if own else
               "it has no tokenizer.json: pass the tokenizer of the data it was trained on as --tokenizer")
        raise ValueError(f"the prompt's ids under the tokenizer {tok.name} ({tok.vocab_size} ids) reach {int(ids.max())}, "
                         f"beyond the model's vocabulary of {V}: {fix}")
    g = torch.Generator(device=model.embed.weight.device).manual_seed(args.seed)
    t0 = time.time()
    out = model.generate(ids.to(model.embed.weight.device), args.max_new_tokens, do_sample=args.do_sample,
                         temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                         top_p=args.top_p, offload=args.offload, generator=g,
                         cuda_graph=False if args.no_cuda_graph else None, compile_step=args.compile_step)
    new = out[0, ids.shape[1]:].tolist()
    sys.stdout.write(tok.decode(new) + "\n")
    print(f"[{ids.shape[1]} prompt tokens, {len(new)} new, {time.time() - t0:.1f}s]", file=sys.stderr)
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained model",
        description="Generate with the streaming cache (any prompt length; --offload keeps the chunk memory on the CPU).",
        epilog="""examples:
  gca generate --ckpt runs/tiny --prompt "The passkey is" --max-new-tokens 20
  gca generate --ckpt runs/small --prompt-file book.txt --max-new-tokens 200 --do-sample --top-p 0.9 --offload""",
        formatter_class=_FMT,
    )
    p.add_argument("--ckpt", required=True, help="a run folder (gca train --out) or its ckpt/ folder")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="the prompt text (this or --prompt-file is required)")
    prompt.add_argument("--prompt-file", default=None, help="read the prompt from this file (required, or --prompt)")
    p.add_argument("--tokenizer", default="embedded",
                   help="when the checkpoint has no tokenizer.json: a tokenizer.json, a folder or a name (default embedded)")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=50, help="tokens to generate (default 50)")
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy decoding)")
    p.add_argument("--temperature", type=float, default=None, help="with --do-sample: softmax temperature (default 1.0)")
    p.add_argument("--top-k", type=int_at_least(1), default=None,
                   help="with --do-sample: sample among the K likeliest tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="with --do-sample: sample among the likeliest tokens holding this probability, in (0, 1] "
                        "(default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--offload", action="store_true", help="keep the chunk memory in CPU memory")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, decode with plain streaming calls instead of replaying a CUDA graph per token")
    p.add_argument("--compile-step", action="store_true",
                   help="compile the graph's decode step with torch.compile first (faster per token; the first "
                        "token waits for the compile, ~7-12 s for the small preset on an H200)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the weights' dtype (default float32)")
    p.set_defaults(func=cmd_generate)


BENCH_DEFAULTS = {"cuda": ("small", "64K,256K,1M"), "cpu": ("tiny", "4K,16K,64K")}  # (--preset, --lengths)


def cmd_bench(args: argparse.Namespace) -> int:
    from gca.inference.bench import bench_streaming

    out = out_file(args.out, "bench.json") if args.out else None  # a bad path fails now, not after the benchmark
    dev = _device(args.device)
    preset, length_text = BENCH_DEFAULTS["cuda" if dev.type == "cuda" else "cpu"]
    preset, length_text = args.preset or preset, args.lengths or length_text
    if args.ckpt:
        ignored = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("preset", "vocab_size")
                   if getattr(args, k) is not None]
        if ignored:  # (as gca train warns of --preset beside --init-from)
            warnings.warn(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored: with --ckpt the model "
                          f"is {args.ckpt}'s")
        model, train_length, _ = load_for_eval(args.ckpt, args.device, args.dtype)
        what = args.ckpt
    else:
        from gca import DRT, DRTConfig

        over = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
        model = DRT(DRTConfig.from_preset(preset, **over)).to(dev).eval()
        if args.dtype != "float32":
            model = model.to({"bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype])
        train_length = None
        what = f"a random {preset} model"
    lengths = parse_lengths(length_text, args.train_length or train_length)
    trial_lengths = parse_lengths(args.passkey_trial, args.train_length or train_length) if args.passkey_trial else []
    if trial_lengths:  # before the benchmark, not after it
        from gca.data.tokenizer import load_tokenizer

        need, V = load_tokenizer("embedded").vocab_size, model.config.vocab_size
        if V < need:
            fix = "drop --vocab-size or --passkey-trial" if args.vocab_size is not None and not args.ckpt else \
                "drop --passkey-trial"
            raise ValueError(f"--passkey-trial needs a model vocabulary of at least {need} ids (the embedded tokenizer's, "
                             f"which writes its prompt); the model has {V}: {fix}")
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.offload]
    arch = model.config.arch
    if arch != "drt" and args.offload != "off":  # (an offloaded run of a baseline measured nothing, silently)
        if args.offload == "on":
            raise ValueError(f"--offload on: a {arch} model has no chunk memory to offload; use --offload off")
        modes, args.offload = (False,), f"off (a {arch} model has no chunk memory)"
    params = sum(p.numel() for p in model.parameters())
    print(f"bench: {what} ({params / 1e6:.1f}M parameters, {args.dtype}) on {dev}, lengths "
          f"{','.join(map(str, lengths))}, offload {args.offload}, {args.decode_tokens} decode tokens", flush=True)
    rows = bench_streaming(model, lengths, offload_modes=modes, decode_tokens=args.decode_tokens,
                           batch_size=args.batch_size, prefill_chunk=args.prefill_chunk,
                           overlap_modes=(True, False) if args.no_overlap_too else (True,),
                           skip_upper=not args.full_prefill, cuda_graph=True)
    print(f"{'length':>10} {'offload':>8} {'overlap':>8} {'prefill s':>10} {'prefill tok/s':>14} {'decode tok/s':>13} "
          f"{'graph tok/s':>12} {'peak GB':>8}")
    for r in rows:
        print(f"{r['context_length']:>10} {str(r['offload']):>8} {str(r['overlap'] if r['offload'] else '-'):>8} "
              f"{r['prefill_s']:>10} {r['prefill_tokens_per_s']:>14} {r['decode_tokens_per_s']:>13} "
              f"{r.get('decode_graph_tokens_per_s', '-'):>12} {r['peak_mem_gb']:>8}")
    from gca.inference.bench import PEAK_RSS_ROW, PEAK_RSS_SO_FAR

    measures = {r.get("peak_mem_measure") for r in rows}
    if PEAK_RSS_SO_FAR in measures:  # (the process's lifetime peak: the same or rising on every row)
        print("peak GB: the process's peak resident memory so far (this system cannot reset it for each row), "
              "not each row's own")
    elif PEAK_RSS_ROW in measures:
        print("peak GB: the process's peak resident memory during each row (weights, Python and memory kept from "
              "earlier rows included)")
    result: dict | list = rows
    if trial_lengths:
        from gca.inference.bench import passkey_trial

        trials = []
        for L in trial_lengths:
            for off in modes:
                t = passkey_trial(model, L, offload=off, prefill_chunk=args.prefill_chunk)
                trials.append(t)
                hit = "" if t["retrieval_hit"] is None else f", needle chunk retrieved {t['retrieval_hit']}"
                print(f"passkey trial {L} tokens, offload {off}: {t['seconds']} s, peak {t['peak_mem_gb']} GB, "
                      f"correct {t['correct']}{hit} (sample built in {t['build_sample_s']} s)")
        result = {"bench": rows, "passkey_trials": trials}
    if out:
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="streaming prefill/decode speed and peak memory against context length",
        description="Prefill and decode tokens/s and peak memory of a DRT against context length, with and without offload.",
        epilog="""examples:
  gca bench --preset small --dtype bfloat16 --lengths 64K,1M,16M --offload both --out bench.json
  gca bench --ckpt runs/tiny --lengths 1x,16x,64x --offload off
  gca bench --preset small --vocab-size 2048 --dtype bfloat16 --lengths 1M --offload on --passkey-trial 16M""",
        formatter_class=_FMT,
    )
    p.add_argument("--ckpt", default=None, help="a run or checkpoint folder (default: a random model of --preset)")
    p.add_argument("--preset", default=None,
                   help=f"DRTConfig preset of the random model: tiny, small, paper (default {BENCH_DEFAULTS['cuda'][0]} "
                        f"on a GPU, {BENCH_DEFAULTS['cpu'][0]} on a CPU)")
    p.add_argument("--lengths", default=None,
                   help=f"context lengths in tokens (4096, 64K, 1M) or multiples of the training length (4x, with --ckpt "
                        f"or --train-length) (default {BENCH_DEFAULTS['cuda'][1]} on a GPU, {BENCH_DEFAULTS['cpu'][1]} on a CPU)")
    p.add_argument("--train-length", type=int_at_least(1), default=None, help="training length for 'Nx' (default: the checkpoint's --seq-len)")
    p.add_argument("--offload", default="both", choices=["both", "on", "off"],
                   help="chunk memory in CPU memory: both (each length twice), on or off (default both)")
    p.add_argument("--decode-tokens", type=int_at_least(1), default=64, help="decode steps timed per length (default 64)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1, help="sequences streamed together (default 1)")
    p.add_argument("--prefill-chunk", type=int_at_least(1), default=16384, help="positions processed at once in the prefill (default 16384)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the weights' dtype (default float32)")
    p.add_argument("--no-overlap-too", action="store_true",
                   help="with offload, also time each prefill with the fetches copied on the compute stream (the overlap's worth)")
    p.add_argument("--full-prefill", action="store_true",
                   help="run every layer over the whole prompt (default: the upper layers only where the kept logit can see them; "
                        "a sliding-window model computes only the positions that reach it)")
    p.add_argument("--passkey-trial", default=None, metavar="LENGTHS",
                   help="also time one passkey trial (prompt streamed + 5-digit answer scored) at these lengths; "
                        "needs a model vocabulary >= 2048, the embedded tokenizer's (default: none)")
    p.add_argument("--vocab-size", type=int_at_least(1), default=None, help="with --preset: override its vocabulary size (default: the preset's)")
    p.add_argument("--out", default=None,
                   help="write the rows as JSON to this file; a folder (existing, or ending in /) gets bench.json inside it "
                        "(default: print only)")
    p.set_defaults(func=cmd_bench)


__all__ = ["add_eval", "add_generate", "add_bench", "parse_lengths", "load_for_eval"]
