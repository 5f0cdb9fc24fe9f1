"""Time one training step (forward + backward + AdamW) of a DRT preset, report peak memory, and
optionally profile where the time goes.

    python benchmarks/train_step.py --preset paper --seq-len 16384            # one GPU
    python benchmarks/train_step.py --preset paper --seq-len 16384 --profile  # + top kernels
    python benchmarks/train_step.py --check                                   # CUDA vs CPU logits

Writes a JSON line per run to ``--out`` (default benchmarks/results/train_step_<gpu>.jsonl).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gca import DRT, DRTConfig  # noqa: E402


def check_cuda_matches_cpu() -> None:
    """The CUDA paths (FlexAttention, and the fused GCA kernel when present) against the CPU
    reference paths on a small fp32 model."""
    torch.manual_seed(0)
    cfg = DRTConfig.from_preset("tiny", vocab_size=512, window=128)
    m = DRT(cfg).eval()
    x = torch.randint(0, 512, (2, 63 * 20 + 11))
    with torch.no_grad():
        ref = m(x, output_retrieval=True)
        mc = DRT(cfg).cuda().eval()
        mc.load_state_dict(m.state_dict())
        out = mc(x.cuda(), output_retrieval=True)
    err = ((out.logits.cpu() - ref.logits).norm() / ref.logits.norm()).item()
    same = torch.equal(out.retrieval[0].indices.cpu(), ref.retrieval[0].indices)
    print(f"check: CUDA vs CPU logits rel err {err:.2e}; same retrieval: {same}")
    assert err < 1e-3 and same, "CUDA path disagrees with the CPU reference"


def time_steps(cfg: DRTConfig, seq_len: int, batch: int, steps: int, warmup: int, ckpt: bool, profile: bool,
               compile: bool = False):
    """Median step time in ms, peak memory in GiB, parameter count, profile table (or None).
    ``compile``: the model runs under ``torch.compile`` (compiled during the warm-up steps)."""
    dev = "cuda"
    model = DRT(cfg).to(dev).train()
    model.gradient_checkpointing = ckpt
    fwd = torch.compile(model, dynamic=False) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    peak = torch.cuda.max_memory_allocated() / 2**30
    prof_table = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        prof_table = (ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
                      + "\n" + ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    return statistics.median(times), peak, model.num_parameters(), prof_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--arch", default="drt", choices=["drt", "swa", "full"])
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--gca-impl", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (compiled during the warm-up)")
    ap.add_argument("--check", action="store_true", help="only compare CUDA and CPU logits")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.check:
        check_cuda_matches_cpu()
        return
    cfg = DRTConfig.from_preset(a.preset, arch=a.arch, gca_impl=a.gca_impl)
    ms, peak, n, table = time_steps(cfg, a.seq_len, a.batch, a.steps, a.warmup, a.grad_checkpointing, a.profile, a.compile)
    gpu = torch.cuda.get_device_name()
    row = dict(
        gpu=gpu, torch=torch.__version__, date=datetime.date.today().isoformat(), preset=a.preset, arch=a.arch,
        gca_impl=a.gca_impl, params=n, seq_len=a.seq_len, batch=a.batch, grad_checkpointing=a.grad_checkpointing,
        compiled=a.compile,
        step_ms=round(ms, 2), tokens_per_s=round(a.batch * a.seq_len / ms * 1e3), peak_mem_gb=round(peak, 2),
    )
    print(json.dumps(row))
    if table:
        print(table)
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"train_step_{gpu.replace(' ', '_')}.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
