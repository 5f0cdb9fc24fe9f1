"""``gca bench``: streaming prefill and decode speed and peak memory against context length,
with and without offloading the chunk memory.

    rows = bench_streaming(model, [65536, 1 << 20], offload_modes=(False, True))
    rows[0]  # {context_length, offload, prefill_s, prefill_tokens_per_s, decode_tokens_per_s, peak_mem_gb, ...}

Random token ids (speed does not depend on them); one untimed warm-up prefill of two windows
first. On CUDA times are taken after a synchronize and peak memory is
``torch.cuda.max_memory_allocated``; on CPU peak memory is the process's peak resident set.
"""

from __future__ import annotations

import resource
import time

import torch

from gca.model import DRT


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


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
) -> list[dict]:
    """Time a streaming prefill of each length, then ``decode_tokens`` greedy decode steps."""
    from tqdm.auto import tqdm

    model.eval()
    dev = model.embed.weight.device
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    warm = model.new_cache(batch_size, prefill_chunk=prefill_chunk)
    model(torch.randint(0, V, (batch_size, 2 * model.config.window), generator=g), cache=warm, logits_to_keep=1)
    del warm
    rows = []
    for L in tqdm([int(n) for n in lengths], desc="bench", disable=not progress):
        for off in offload_modes:
            if off and model.config.arch != "drt":
                continue
            ids = torch.randint(0, V, (batch_size, L), generator=g)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            cache = model.new_cache(batch_size, offload=off, prefill_chunk=prefill_chunk)
            _sync(dev)
            t0 = time.perf_counter()
            logits = model(ids, cache=cache, logits_to_keep=1).logits
            _sync(dev)
            t_prefill = time.perf_counter() - t0
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(decode_tokens):
                nxt = model(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            _sync(dev)
            t_decode = time.perf_counter() - t0
            if dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated(dev) / 2**30
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
            mem = cache.memory
            rows.append(dict(
                context_length=L, batch_size=batch_size, offload=bool(off), device=str(dev),
                prefill_s=round(t_prefill, 3), prefill_tokens_per_s=round(batch_size * L / t_prefill),
                decode_tokens_per_s=round(batch_size * decode_tokens / t_decode, 1),
                peak_mem_gb=round(peak, 3),
                memory_device_gb=round(mem.nbytes_device() / 2**30, 3) if mem is not None else None,
                fetched_gb=round(mem.bytes_fetched / 2**30, 3) if mem is not None else None,
            ))
            del cache, ids
    return rows
