"""``gca bench``: streaming prefill and decode speed and peak memory against context length,
with and without offloading the chunk memory.

    rows = bench_streaming(model, [65536, 1 << 20], offload_modes=(False, True))
    rows[0]  # {context_length, offload, prefill_s, prefill_tokens_per_s, decode_tokens_per_s, peak_mem_gb, ...}

Random token ids (speed does not depend on them); one untimed warm-up prefill of two windows
first. On CUDA times are taken after a synchronize and peak memory is
``torch.cuda.max_memory_allocated``, reset for each row; on CPU it is the process's peak resident set
(weights and Python included), reset for each row where Linux allows it (``/proc/self/clear_refs``),
else the process's peak so far. Each row's ``peak_mem_measure`` says which.
"""

from __future__ import annotations

import re
import resource
import sys
import time

import torch

from gca.config import check_counts
from gca.model import DRT


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


PEAK_CUDA = "cuda max_memory_allocated, this row"
PEAK_RSS_ROW = "process peak resident set, this row"
PEAK_RSS_SO_FAR = "process peak resident set so far (not reset per row)"


def _reset_peak(dev: torch.device) -> str:
    """Start a fresh peak-memory measurement on ``dev``; returns what :func:`_peak_gb` will then measure
    (a row's ``peak_mem_measure``). On CPU the process's peak resident set is reset through
    ``/proc/self/clear_refs`` (Linux); where that cannot be done, the peak is the process's lifetime one."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        return PEAK_CUDA
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set, to the present one
        _vm_hwm_kib()
        return PEAK_RSS_ROW
    except (OSError, ValueError):
        return PEAK_RSS_SO_FAR


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
    if not m:
        raise ValueError("no VmHWM in /proc/self/status")
    return int(m.group(1))


def _peak_gb(dev: torch.device, measure: str) -> float:
    """The peak memory in GiB since :func:`_reset_peak` returned ``measure``."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    if measure == PEAK_RSS_ROW:
        return _vm_hwm_kib() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB (bytes on macOS)
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


@torch.no_grad()
def bench_streaming(
    model: DRT,
    lengths,
    *,
    offload_modes=(False, True),
    decode_tokens: int = 64,
    batch_size: int = 1,
    prefill_chunk: int = 16384,
    seed: int = 0,
    progress: bool = True,
    overlap_modes=(True,),
    skip_upper: bool = True,
    cuda_graph: bool = False,
) -> list[dict]:
    """Time a streaming prefill of each length, then ``decode_tokens`` greedy decode steps (after
    one untimed step), with plain streaming calls; with ``cuda_graph`` (CUDA),
    then as many more through a :class:`gca.inference.GraphDecoder` on the same cache (its first
    step, which captures the graph, untimed and reported as ``decode_graph_first_step_ms``).

    ``overlap_modes``: with offload, also time the prefill with the fetches copied on the compute
    stream (``False``), which shows what overlapping them with self-attention saves. ``skip_upper=False``
    runs every layer over the whole prompt (by default the prefill, which keeps one logit, runs the
    upper layers only where that logit can see them: ``DRT.new_cache``; a sliding-window baseline then
    computes only its last layers x window positions, so time its prefill with ``skip_upper=False``)."""
    from tqdm.auto import tqdm

    check_counts("bench_streaming", decode_tokens=decode_tokens, batch_size=batch_size, prefill_chunk=prefill_chunk)
    if not lengths or any(int(n) < 1 for n in lengths):
        raise ValueError(f"bench_streaming: lengths must be positive token counts, got {list(lengths)!r}")
    model.eval()
    dev = model.embed.weight.device
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    # warm-up (untimed): kernels compile and pick their configurations on first use, for the prefill
    # pieces and for the decode step
    longest = max(int(n) for n in lengths)
    for off in offload_modes:
        warm = model.new_cache(batch_size, offload=off, prefill_chunk=prefill_chunk)
        n_warm = min(longest, 4 * prefill_chunk)
        logits = model(torch.randint(0, V, (batch_size, n_warm), generator=g), cache=warm, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(4):
            nxt = model(nxt, cache=warm).logits[:, -1].argmax(-1, keepdim=True)
        del warm, logits, nxt
    _sync(dev)
    rows = []
    runs = [(L, off, ov) for L in [int(n) for n in lengths] for off in offload_modes for ov in (overlap_modes if off else (True,))
            if not (off and model.config.arch != "drt")]
    for L, off, ov in tqdm(runs, desc="bench", disable=not progress):
        ids = torch.randint(0, V, (batch_size, L), generator=g)
        measure = _reset_peak(dev)
        # every token the run feeds: the untimed and timed plain steps, then as many through the graph (a
        # memory sized for fewer grew inside the timed graph loop: a re-capture, two copies at the peak)
        steps = (decode_tokens + 1) * (2 if cuda_graph and dev.type == "cuda" else 1)
        cache = model.new_cache(batch_size, offload=off, prefill_chunk=prefill_chunk, max_tokens=L + steps,
                                skip_upper=skip_upper)
        if cache.memory is not None:
            cache.memory.overlap = ov
        _sync(dev)
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, logits_to_keep=1).logits
        _sync(dev)
        t_prefill = time.perf_counter() - t0
        mem = cache.memory
        prefill_fetch = (mem.bytes_fetched, mem.fetch_host_s) if mem is not None else (0, 0.0)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        nxt = model(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)  # untimed, as the graph's first step
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            nxt = model(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        _sync(dev)
        t_decode = time.perf_counter() - t0
        graph = {}
        if cuda_graph and dev.type == "cuda":
            from gca.inference.graph import GraphDecoder

            dec = GraphDecoder(model, cache, graph=True)
            t0 = time.perf_counter()
            nxt = dec.step(nxt[:, 0]).argmax(-1)
            _sync(dev)
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(decode_tokens):
                nxt = dec.step(nxt).argmax(-1)
            _sync(dev)
            t_graph = time.perf_counter() - t0
            graph = dict(decode_graph_tokens_per_s=round(batch_size * decode_tokens / t_graph, 1),
                         decode_graph_ms_per_token=round(1000 * t_graph / decode_tokens, 3),
                         decode_graph_first_step_ms=round(1000 * t_first, 1),
                         decode_graph_eager_steps=dec.eager_steps)
            del dec
        peak = _peak_gb(dev, measure)
        rows.append(dict(
            context_length=L, batch_size=batch_size, offload=bool(off), overlap=bool(ov) if off else None,
            device=str(dev), arch=model.config.arch, skip_upper=bool(skip_upper) if model.config.arch != "full" else None,
            prefill_s=round(t_prefill, 3), prefill_tokens_per_s=round(batch_size * L / t_prefill),
            decode_tokens_per_s=round(batch_size * decode_tokens / t_decode, 1),
            decode_ms_per_token=round(1000 * t_decode / decode_tokens, 3),
            **graph,
            peak_mem_gb=round(peak, 3), peak_mem_measure=measure,
            memory_device_gb=round(mem.nbytes_device() / 2**30, 3) if mem is not None else None,
            prefill_fetched_gb=round(prefill_fetch[0] / 2**30, 6) if mem is not None else None,
            prefill_fetch_host_s=round(prefill_fetch[1], 3) if mem is not None else None,
        ))
        del cache, ids, mem, logits, nxt  # free this run's memory before the next one measures its peak
    return rows


@torch.no_grad()
def passkey_trial(model: DRT, context_len: int, *, offload: bool = True, seed: int = 0, depth: float = 0.5,
                  prefill_chunk: int = 16384) -> dict:
    """One passkey trial in the paper's form at ``context_len`` tokens (embedded tokenizer and filler),
    timed end to end on the model's device: stream the prompt, then score the 5-digit answer greedily
    (what :func:`gca.eval.tasks.score_samples` does). The sample is built first, untimed. ``retrieval_hit``
    is None for a model without retrieval (``swa``, ``full``)."""
    from gca.data.tasks import make_task_sample
    from gca.eval.tasks import score_samples

    dev = model.embed.weight.device
    t0 = time.perf_counter()
    s = make_task_sample("passkey", context_len=context_len, seed=seed, depth=depth,
                         text_per_chunk=model.config.text_per_chunk)
    build_s = time.perf_counter() - t0
    if max(s.input_ids) >= model.config.vocab_size:
        raise ValueError("the model's vocabulary is smaller than the embedded tokenizer's (2048 ids)")
    measure = _reset_peak(dev)
    _sync(dev)
    t0 = time.perf_counter()
    cache = model.new_cache(1, offload=offload, prefill_chunk=prefill_chunk, max_tokens=len(s.input_ids))
    (correct,), (hit,), _ = score_samples(model, [s], cache=cache)
    _sync(dev)
    seconds = time.perf_counter() - t0
    peak = _peak_gb(dev, measure)
    mem = cache.memory
    return dict(task="passkey", context_length=context_len, prompt_length=s.prompt_len, offload=offload, depth=depth,
                seconds=round(seconds, 2), tokens_per_s=round(s.prompt_len / seconds), peak_mem_gb=round(peak, 3),
                peak_mem_measure=measure,
                correct=correct, retrieval_hit=hit if model.config.arch == "drt" else None,  # baselines: nothing to hit
                build_sample_s=round(build_s, 2),
                fetched_gb=round(mem.bytes_fetched / 2**30, 6) if mem is not None else None,
                fetch_host_s=round(mem.fetch_host_s, 2) if mem is not None else None,
                device=str(dev), arch=model.config.arch)
