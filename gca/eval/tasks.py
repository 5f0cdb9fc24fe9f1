"""Needle evaluation (passkey, multi-key, 2-hop) over a grid of context lengths x needle depths.

    rows = evaluate_tasks(model, tasks=["passkey"], lengths=[504, 2016, 8064], depths=5, trials=20)
    rows[0]  # {"task", "context_length", "depth", "trials", "accuracy", "retrieval_hit", ...}

Each trial streams the prompt through a :class:`~gca.inference.cache.DRTCache` (so only memory
limits the length), then scores the answer. A trial is correct when the model's greedy
continuation (as many tokens as the answer has) is exactly the answer. ``retrieval_hit`` is
whether the target needle's chunk is among the chunks retrieved (by any group) at the landmark
that serves the answer (``TaskSample.query_chunk``); None for a model without retrieval (the
``swa`` and ``full`` baselines).
``distractor_answer`` (multikey and 2hop) is how often the greedy answer is a distractor needle's
value instead (2hop: another chain's answer): with 2hop's default of two chains, a model that finds
the chains' end points but not which one the question's chain reaches scores about 50% accuracy and
50% distractor answers. 2hop asks for the chain (``Y , Z``) unless ``hop_answer="end"`` is passed;
its rows carry ``hop_answer`` and, for the chain, ``first_hop``: how often Y alone was right.

Prompts are aligned so that the question ends where a chunk ends and the answer starts one token
into the next chunk (see :mod:`gca.data.tasks`); ``context_length`` is the requested prompt
length, the prompt has the largest length <= it that satisfies the alignment.
"""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import torch

from gca.config import check_counts
from gca.eval import keeps_mode
from gca.model import DRT


def beyond_window(sample, cfg) -> bool:
    """Whether every target needle of ``sample`` lies wholly outside the sliding window of the first
    answer prediction (``cfg.window`` positions, landmarks included for a DRT): the answer's position
    cannot attend to it directly, only through retrieval (DRT) or through several stacked windows.
    Always False for full attention."""
    if cfg.arch == "full" or cfg.window is None:
        return False
    P, S = sample.text_per_chunk, cfg.chunk_size

    def pos(p: int) -> int:  # internal position of user token p
        return (p // P) * S + p % P if cfg.arch == "drt" else p

    last = sample.prompt_len - 1
    # the answer is predicted at the prompt's last token, or at the landmark that follows it when that
    # token closes a chunk (DRT.insert_landmarks)
    q = pos(last) + int(cfg.arch == "drt" and last % P == P - 1)
    targets = sample.needle_spans[: len(sample.target_chunks)]
    return all(q - pos(end - 1) >= cfg.window for _, end in targets)


def _depth_list(depths) -> list[float]:
    if isinstance(depths, int):
        if depths < 1:
            raise ValueError(f"depths must be a count >= 1 or a list of depths in [0, 1], got {depths}")
        return [0.5] if depths == 1 else [i / (depths - 1) for i in range(depths)]
    out = [float(d) for d in depths]
    if not out or not all(0 <= d <= 1 for d in out):
        raise ValueError(f"depths must be a count >= 1 or a list of depths in [0, 1], got {list(depths)!r}")
    return out


def default_prefill_chunk(device) -> int:
    """Prompt positions streamed at once in evaluation: 16K on a GPU (fewer, larger launches), 4K
    elsewhere (the same speed on a CPU, a quarter of the activation memory)."""
    return 16384 if torch.device(device).type == "cuda" else 4096


@torch.no_grad()
def score_samples(model: DRT, samples: list, *, offload: bool = False, device=None, cache=None,
                  prefill_chunk: int | None = None, first_hop: bool = False,
                  predictions: list | None = None) -> tuple[list[bool], ...]:
    """Exact match, retrieval hit and distractor answer (the greedy answer is one of the sample's
    ``distractor_answers``) of task samples that share prompt and answer lengths (one batch).
    ``first_hop=True`` adds a fourth list: whether the answer's first ``first_hop_len`` tokens (a 2hop
    chain's first hop, Y) are right. ``predictions``: a list that gets each sample's greedy answer
    (token ids), in order.
    ``cache``: a fresh cache to stream through (default: a new one sized for the samples, streaming
    the prompt ``prefill_chunk`` positions at a time, default :func:`default_prefill_chunk`)."""
    device = device or model.embed.weight.device
    prefill_chunk = prefill_chunk or default_prefill_chunk(device)
    P = model.config.text_per_chunk
    assert all(s.text_per_chunk == P for s in samples), "samples were built for another chunk size"
    shapes = sorted({(len(s.prompt), len(s.answer)) for s in samples})
    if len(shapes) > 1:  # np.stack failed with a bare shape error
        raise ValueError(f"score_samples scores one batch, whose samples share prompt and answer lengths; got "
                         f"(prompt, answer) lengths {shapes[:4]}{' ...' if len(shapes) > 4 else ''}: group them by length "
                         f"(evaluate_tasks does)")
    prompts = torch.from_numpy(np.stack([np.asarray(s.prompt, dtype=np.int64) for s in samples])).to(device)
    answers = torch.tensor([s.answer for s in samples], dtype=torch.long, device=device)
    if cache is None:
        cache = model.new_cache(len(samples), offload=offload, prefill_chunk=prefill_chunk,
                                max_tokens=max(len(s.input_ids) for s in samples))
    # answer[0] is predicted with the retrieval made at landmark query_chunk, the cache's last row after an
    # aligned prompt; an unaligned prompt whose last token closes a chunk adds one more row (at that token's
    # landmark, for the chunk after): its rows are read before that token
    L = prompts.shape[1]
    head = L - 1 if model.config.arch == "drt" and L % P == 0 else L
    first = model(prompts[:, :head], cache=cache, logits_to_keep=1).logits
    rows = list(cache.last_rows)
    if head < L:
        first = model(prompts[:, head:], cache=cache, logits_to_keep=1).logits  # predicts answer[0]
    hits = [False] * len(samples)
    if model.config.arch == "drt":
        q = samples[0].query_chunk
        if rows and q >= 0:
            for idx, _ in rows:
                for b, s in enumerate(samples):
                    hits[b] = hits[b] or bool((idx[b] == s.target_chunk).any())
    # greedy decoding of the answer's length: exact match with the answer, or with a distractor's value
    tok = first[:, -1].argmax(-1)
    greedy = [tok]
    for _ in range(answers.shape[1] - 1):
        tok = model(tok[:, None], cache=cache).logits[:, -1].argmax(-1)
        greedy.append(tok)
    pred = torch.stack(greedy, 1)
    correct = (pred == answers).all(-1).tolist()
    greedy_ids = pred.tolist()
    if predictions is not None:
        predictions.extend(greedy_ids)
    distracted = [any(g == d for d in s.distractor_answers) for g, s in zip(greedy_ids, samples)]
    if first_hop:
        n = samples[0].first_hop_len
        hop1 = (pred[:, :n] == answers[:, :n]).all(-1).tolist() if n else [False] * len(samples)
        return correct, hits, distracted, hop1
    return correct, hits, distracted


def cell_samples(task: str, length: int, depth: float, trials: int, seed: int, cell: list[int], *, text_per_chunk: int,
                 tokenizer=None, filler=None, **task_kwargs) -> list:
    """The ``trials`` samples of one (task, length, depth) of :func:`evaluate_tasks`, rebuilt from ``[seed, *cell]``
    (``cell``: the task's, length's and depth's places in the evaluation's lists), so that a tool given the same
    tasks, lengths, depths and seed sees the prompts ``gca eval tasks`` scored."""
    from gca.data.tasks import make_task_sample

    rng = np.random.default_rng([seed, *cell])
    return [make_task_sample(task, context_len=length, seed=rng, tokenizer=tokenizer, filler=filler, depth=depth,
                             text_per_chunk=text_per_chunk, **task_kwargs) for _ in range(trials)]


_STATE_LISTS = ("correct", "retrieval_hit", "distractor_answer", "first_hop", "predictions")  # per trial, in order


def partial_state_whole(state: dict, trials: int) -> bool:
    """Whether ``state`` (an :func:`evaluate_tasks` ``on_batch`` dict) has between 1 and ``trials - 1`` trials
    done and each per-trial list that long."""
    n = state.get("done")
    return (isinstance(n, int) and 0 < n < trials
            and all(isinstance(state.get(k), list) and len(state[k]) == n for k in _STATE_LISTS))


@keeps_mode
def evaluate_tasks(
    model: DRT,
    tasks: Iterable[str] = ("passkey",),
    lengths: Iterable[int] = (504,),
    depths=5,
    trials: int = 20,
    *,
    seed: int = 1234,
    tokenizer=None,
    filler=None,
    batch_size: int = 8,
    offload: bool = False,
    prefill_chunk: int | None = None,
    progress: bool = True,
    on_row=None,
    done: Iterable[dict] = (),
    on_batch=None,
    partial: Iterable[dict] = (),
    **task_kwargs,
) -> list[dict]:
    """Accuracy and retrieval hit rate for every (task, length, depth).

    Args:
        tasks: any of ``"passkey"``, ``"multikey"``, ``"2hop"``.
        lengths: prompt lengths in tokens.
        depths: a count (evenly spaced in [0, 1]) or a list of relative needle depths.
        trials: trials per (task, length, depth); seeds differ from every training stream.
        tokenizer, filler: as in :func:`gca.data.tasks.make_task_sample` (default: embedded); a
            prepared folder as filler is read from its ``val`` split (held-out text).
        batch_size: trials scored together (one streaming batch).
        prefill_chunk: positions of the prompt processed at once (``DRT.new_cache``); the answers do
            not depend on it. Default: 16K on a GPU, where larger pieces mean fewer launches; 4K
            on a CPU, where they take the same time and a quarter of the memory.
        on_row: called with the list of rows so far after each (task, length, depth), e.g. to save
            partial results of a long evaluation.
        done: rows an interrupted run of this same evaluation returned or saved (the same model, seed,
            trials, tasks, lengths, depths and task options): a (task, length, depth) with a row there is
            kept, not measured again. Every cell's trials rebuild from its own seed, so the rows measured now
            are those an uninterrupted run gives. A row of another seed, trial count or cell is refused.
        on_batch: called after each batch of a (task, length, depth) that has trials left, with the cell's
            state so far: ``{task, context_length, depth, seed, trials, cell, done, correct, retrieval_hit,
            distractor_answer, first_hop, predictions, seconds}`` (per-trial lists, ``done`` trials long;
            JSON-ready), e.g. to save the trials of a long cell as they finish.
        partial: such states of an interrupted run of this same evaluation: a cell with one resumes after its
            ``done`` trials (the others rebuild from the cell's seed, so with the same ``batch_size`` the row
            equals an uninterrupted run's). A state of another seed, trial count or cell, or one for a cell
            ``done`` holds, is refused.
    Returns:
        a list of dicts ``{task, context_length, prompt_length, depth, trials, seed, cell, accuracy,
        retrieval_hit (None without retrieval: ``arch`` swa or full), distractor_answer (None for passkey),
        [hop_answer, first_hop (2hop)], trials_beyond_window,
        accuracy_beyond_window, misses, seconds}``; the two ``*beyond_window`` keys count
        the trials whose needles lay outside the answer's sliding window (:func:`beyond_window`;
        accuracy None when there were none): where a DRT must retrieve to answer. ``misses``: one
        ``{trial, answer, output, needle_retrieved}`` per wrong trial (text decoded; ``needle_retrieved``
        None without retrieval; ``trial`` its index
        among the (task, length, depth)'s trials, which rebuild from ``[seed, task index, length index,
        depth index]``; ``cell`` is that ``[task index, length index, depth index]``).
    """
    from gca.data.tasks import is_filler, make_filler, make_task_sample
    from gca.data.tokenizer import load_tokenizer

    from tqdm.auto import tqdm

    if filler is not None and not is_filler(filler):
        filler = make_filler(filler, tokenizer, split="val")  # a prepared folder: its held-out split, opened once

    check_counts("evaluate_tasks", trials=trials, batch_size=batch_size)
    tok = load_tokenizer(tokenizer if tokenizer is not None else getattr(filler, "tokenizer", None) or "embedded")
    tasks, lengths, dl = list(tasks), [int(n) for n in lengths], _depth_list(depths)
    retrieves = model.config.arch == "drt"  # the baselines have no retrieval to hit: their rows say None, not 0
    for task in tasks if lengths else []:  # a length too short for a task fails now, not after others ran
        for d in dl:
            make_task_sample(task, context_len=min(lengths), seed=np.random.default_rng(seed), tokenizer=tokenizer,
                             filler=filler, depth=d, text_per_chunk=model.config.text_per_chunk, **task_kwargs)
    cells = {(task, L, round(d, 4)): [ti, li, di] for li, L in enumerate(lengths) for ti, task in enumerate(tasks)
             for di, d in enumerate(dl)}
    earlier = {}  # (task, length, depth) -> a row of `done`
    for r in done:
        at = (r.get("task"), r.get("context_length"), r.get("depth"))
        if r.get("seed") != seed or r.get("trials") != trials or r.get("cell") != cells.get(at):
            raise ValueError(f"evaluate_tasks: a done row of seed {r.get('seed')}, {r.get('trials')} trials and cell "
                             f"{r.get('cell')} cannot stand for this evaluation's {at} (seed {seed}, {trials} trials, "
                             f"cell {cells.get(at)}): pass the rows of an interrupted run of the same evaluation")
        earlier[at] = r
    resumed = {}  # (task, length, depth) -> an unfinished cell's state (on_batch's dict)
    for st in partial:
        at = (st.get("task"), st.get("context_length"), st.get("depth"))
        n = st.get("done")
        if st.get("seed") != seed or st.get("trials") != trials or st.get("cell") != cells.get(at):
            raise ValueError(f"evaluate_tasks: a partial cell of seed {st.get('seed')}, {st.get('trials')} trials and "
                             f"cell {st.get('cell')} cannot stand for this evaluation's {at} (seed {seed}, {trials} "
                             f"trials, cell {cells.get(at)}): pass the on_batch state of an interrupted run of the same "
                             f"evaluation")
        if at in earlier or at in resumed:
            raise ValueError(f"evaluate_tasks: {at} has a done row or another partial state already: pass one of them")
        if not partial_state_whole(st, trials):
            raise ValueError(f"evaluate_tasks: the partial state of {at} says {n!r} trials done of {trials}, and its lists "
                             f"hold {[len(v) if isinstance(v := st.get(k), list) else None for k in _STATE_LISTS]}: not a state "
                             f"on_batch wrote")
        resumed[at] = st
    rows = []
    total = len(tasks) * len(lengths) * len(dl)
    bar = tqdm(total=total * trials, desc="eval", unit="trial", disable=not progress)
    for li, L in enumerate(lengths):  # length-major, so that a stopped evaluation has its short lengths
        for ti, task in enumerate(tasks):
            for di, d in enumerate(dl):
                kept = earlier.get((task, L, round(d, 4)))
                if kept is not None:  # measured before the interruption: its seed is this cell's own
                    rows.append(kept)
                    bar.update(trials)
                    continue
                t0 = time.time()
                samples = cell_samples(task, L, d, trials, seed, [ti, li, di], tokenizer=tokenizer, filler=filler,
                                       text_per_chunk=model.config.text_per_chunk, **task_kwargs)
                st = resumed.get((task, L, round(d, 4)))
                correct, hits, distracted, hop1, preds = ([list(st[k]) for k in _STATE_LISTS] if st is not None
                                                          else ([], [], [], [], []))
                spent = st.get("seconds", 0.0) if st is not None else 0.0
                bar.update(len(correct))
                for i in range(len(correct), trials, batch_size):
                    c, h, o, f = score_samples(model, samples[i : i + batch_size], offload=offload,
                                               prefill_chunk=prefill_chunk, first_hop=True, predictions=preds)
                    correct += c
                    hits += h
                    distracted += o
                    hop1 += f
                    bar.update(len(c))
                    if on_batch is not None and len(correct) < trials:
                        on_batch(dict(task=task, context_length=L, depth=round(d, 4), seed=seed, trials=trials,
                                      cell=[ti, li, di], done=len(correct), correct=list(correct), retrieval_hit=list(hits),
                                      distractor_answer=list(distracted), first_hop=list(hop1),
                                      predictions=[list(p) for p in preds],
                                      seconds=round(spent + time.time() - t0, 2)))
                chain = samples[0].first_hop_len > 0
                far = [c for c, smp in zip(correct, samples) if beyond_window(smp, model.config)]
                rows.append(dict(
                    task=task, context_length=L, prompt_length=samples[0].prompt_len, depth=round(d, 4),
                    trials=trials, seed=seed, cell=[ti, li, di], accuracy=float(np.mean(correct)),
                    retrieval_hit=float(np.mean(hits)) if retrieves else None,
                    distractor_answer=float(np.mean(distracted)) if task != "passkey" else None,
                    **({"hop_lead": task_kwargs["hop_lead"]} if task == "2hop" and task_kwargs.get("hop_lead") else {}),
                    **({"hop_answer": "chain" if chain else "end"} if task == "2hop" else {}),
                    **({"first_hop": float(np.mean(hop1))} if chain else {}),
                    trials_beyond_window=len(far),
                    accuracy_beyond_window=float(np.mean(far)) if far else None,
                    misses=[dict(trial=j, answer=tok.decode(smp.answer), output=tok.decode(p),
                                 needle_retrieved=hit if retrieves else None)
                            for j, (smp, p, ok, hit) in enumerate(zip(samples, preds, correct, hits)) if not ok],
                    seconds=round(spent + time.time() - t0, 2),
                ))
                if on_row is not None:
                    on_row(rows)
    bar.close()
    return rows


def summarize_beyond_window(rows: list[dict]) -> dict[tuple[str, int], tuple[float | None, int]]:
    """(accuracy, trials) over the trials whose needles were beyond the window (:func:`beyond_window`),
    pooled over depths for each (task, context_length); accuracy None when there were none."""
    out: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        n = r.get("trials_beyond_window", 0)
        acc = out.setdefault((r["task"], r["context_length"]), [0.0, 0])
        if n:
            acc[0] += r["accuracy_beyond_window"] * n
            acc[1] += n
    return {k: (c / n if n else None, n) for k, (c, n) in out.items()}


def summarize(rows: list[dict], key: str = "accuracy") -> dict[tuple[str, int], float]:
    """Mean of ``key`` over depths for each (task, context_length); rows whose ``key`` is None (a
    baseline's ``retrieval_hit``) are left out, and a (task, context_length) with none is absent."""
    out: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r[key] is not None:
            out.setdefault((r["task"], r["context_length"]), []).append(r[key])
    return {k: float(np.mean(v)) for k, v in out.items()}
