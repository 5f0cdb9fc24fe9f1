"""Benchmark the fused Triton GCA kernels on one CUDA GPU.

    PYTHONPATH=. python benchmarks/bench_gca.py                 # check + table + results files
    PYTHONPATH=. python benchmarks/bench_gca.py --sweep         # also time a few launch configs
    PYTHONPATH=. python benchmarks/bench_gca.py --quick         # the SPEC shape only
    PYTHONPATH=. python benchmarks/bench_gca.py --sweep-only    # only the config sweep
    PYTHONPATH=. python benchmarks/bench_gca.py --sweep-only --sweep-kinds dkdv   # dK/dV configs only
    PYTHONPATH=. python benchmarks/bench_gca.py --profile-bwd --override '{"dkdv": {"TRANSPOSED": false}}'
    PYTHONPATH=. python benchmarks/bench_gca.py --versus old_gca_triton.py   # A/B against another commit's kernels

Steps:
1. correctness at the SPEC shape: the kernel in fp32 and bf16 against the torch reference in fp32
   (relative max error of the output and all four gradients);
2. timings (``triton.testing.do_bench``: warm-up, then the median) at the SPEC shape (4 sequences x
   16K tokens, chunks S = Sm = 64, Cq = Cm = 256, H = Hk = 12, D = 64, K = 8, bf16; random causal
   retrieval j < c, empty slots for the first chunks) and variants (K = 4, 16; D = 128 with H = 6;
   one 64K-token sequence): our forward and forward+backward (eager, and the launchers replayed from
   a CUDA graph: the GPU's time without the host's), the torch reference forward and
   fwd+bwd, dense causal SDPA over the same tokens ``(B, H, C*S, D)``, and the floor
   ``max(flops / PEAK_FLOPS, bytes / PEAK_BW)`` from :func:`gca.ops.gca_triton.flops` and
   :func:`gca.ops.gca_triton.bytes_moved`;
3. writes ``<out-dir>/gca_<gpu-slug>.json`` (a list of ``{gpu, torch, triton, date, shape: {B, C,
   S, H, D, K}, fwd_ms, fwdbwd_ms, floor_fwd_ms, ...}``) and ``<out-dir>/gca_<gpu-slug>.md``.

Ceilings: PEAK_FLOPS = 714e12 FLOP/s (bf16 dense, the figure SPEC.md uses); PEAK_BW is measured here
(device-to-device copy of 2 GiB, read + write bytes / time) and printed.
"""

import argparse
import datetime
import json
import os
import re
import sys

import torch
import triton
import triton.testing
import torch.nn.functional as F

from gca.ops import gca_triton as gt
from gca.ops.gca_ref import gca_reference

PEAK_FLOPS = 714e12
DEVICE = "cuda"


def make_inputs(B, C, S, H, Hk, D, K, dtype=torch.bfloat16, device=None):
    """SPEC-like inputs: query chunk c retrieves K distinct chunks j < c (fewer, padded with -1,
    when c < K); weights are a softmax of random scores over the valid slots."""
    device = device or DEVICE
    q = torch.randn(B, C, S, H, D, device=device, dtype=dtype)
    mem_k = torch.randn(B, C, S, Hk, D, device=device, dtype=dtype)
    mem_v = torch.randn(B, C, S, Hk, D, device=device, dtype=dtype)
    scores = torch.rand(B, C, C, device=device)
    causal = torch.ones(C, C, device=device, dtype=torch.bool).tril(-1)  # j < c
    scores = scores.masked_fill(~causal, -1.0)
    top, idx = scores.topk(min(K, C), dim=-1)
    idx = torch.where(top >= 0, idx, -1)
    if K > C:
        idx = torch.cat([idx, idx.new_full((B, C, K - C), -1)], -1)
        top = torch.cat([top, top.new_full((B, C, K - C), -1.0)], -1)
    logits = torch.randn(B, C, K, device=device).masked_fill(idx < 0, float("-inf"))
    w = torch.softmax(logits, -1).nan_to_num(0.0)  # rows with no valid slot: all zero
    return q, mem_k, mem_v, idx, w


def measure_bandwidth():
    x = torch.empty(2**30, dtype=torch.int16, device=DEVICE)  # 2 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=100)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def bench(fn, grad_to_none=None):
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def correctness_check(shape):
    B, C, S, H, Hk, D, K = shape
    print(f"correctness at B={B} C={C} S={S} H={H} Hk={Hk} D={D} K={K}: rel max err vs torch reference (fp32)")
    q, k, v, idx, w = make_inputs(B, C, S, H, Hk, D, K, dtype=torch.float32)
    g = torch.randn_like(q)

    def run(fn, dtype):
        ins = [t.to(dtype).detach().requires_grad_(True) for t in (q, k, v)] + [w.detach().requires_grad_(True)]
        out = fn(ins[0], ins[1], ins[2], idx, ins[3])
        grads = torch.autograd.grad(out, ins, g.to(dtype))
        return [out.float()] + [x.float() for x in grads]

    ref = run(gca_reference, torch.float32)
    ok = True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        ours = run(gt.gca_triton, dtype)
        errs = [rel_err(a, r) for a, r in zip(ours, ref)]
        names = ("out", "dq", "dk", "dv", "dw")
        print(f"  {str(dtype):15s} " + "  ".join(f"{n}={e:.2e}" for n, e in zip(names, errs)))
        ok &= all(e < tol for e in errs)
    print("  correctness:", "OK" if ok else "FAILED")
    del ref
    torch.cuda.empty_cache()
    return ok


def run_case(name, B, C, S, H, Hk, D, K, peak_bw, with_ref=True, with_sdpa=True):
    q, k, v, idx, w = make_inputs(B, C, S, H, Hk, D, K)
    row = {"name": name, "kernel": "gluon" if gt.gluon_reason(q, k, v, idx, w) is None else "triton"}
    # ours, forward
    row["fwd_ms"] = bench(lambda: gt.gca_triton(q, k, v, idx, w, validate=False))
    # ours, forward + backward
    qg, kg, vg, wg = (t.detach().requires_grad_(True) for t in (q, k, v, w))
    g = torch.randn_like(q)

    def fb():
        gt.gca_triton(qg, kg, vg, idx, wg, validate=False).backward(g)

    row["fwdbwd_ms"] = bench(fb, grad_to_none=[qg, kg, vg, wg])
    # the same work through the launchers, replayed from a CUDA graph: the GPU's time without the host's
    # enqueue, which the eager columns sit near at these sizes (KERNEL_NOTES.md); on one stream, since
    # the backward keeps its second stream out of a capture
    try:
        def fb_graph():
            gt.gca_bwd(g, q, k, v, idx, w, gt.gca_fwd(q, k, v, idx, w)[1])

        row["fwd_graph_ms"] = triton.testing.do_bench_cudagraph(lambda: gt.gca_fwd(q, k, v, idx, w), rep=50,
                                                                return_mode="median")
        row["fwdbwd_graph_ms"] = triton.testing.do_bench_cudagraph(fb_graph, rep=50, return_mode="median")
    except (RuntimeError, torch.OutOfMemoryError) as e:
        row["graph_note"] = f"CUDA graph timing failed: {str(e).splitlines()[0][:160]}"
        print(f"  {name}: {row['graph_note']}", flush=True)
    torch.cuda.empty_cache()
    # floor
    valid = idx >= 0
    b_of = torch.arange(B, device=idx.device)[:, None, None].expand_as(idx)
    n_unique = torch.unique((b_of * C + idx)[valid]).numel()
    f = gt.flops(B, C, S, S, H, D, K)
    by = gt.bytes_moved(B, C, n_unique, S, S, H, Hk, D, K)
    row["floor_fwd_ms"] = max(f / PEAK_FLOPS, by / peak_bw) * 1e3
    row["tflops_fwd"] = f / (row["fwd_ms"] * 1e-3) / 1e12
    fb_flops = f + gt.flops(B, C, S, S, H, D, K, backward=True)
    fb_bytes = by + gt.bytes_moved(B, C, n_unique, S, S, H, Hk, D, K, backward=True)
    row["floor_fwdbwd_ms"] = max(fb_flops / PEAK_FLOPS, fb_bytes / peak_bw) * 1e3
    # torch reference (fp32 math inside; memory grows with K: per-slot gathers are kept for backward)
    if with_ref:
        try:
            row["ref_fwd_ms"] = bench(lambda: gca_reference(q, k, v, idx, w))
            row["ref_fwdbwd_ms"] = bench(lambda: gca_reference(qg, kg, vg, idx, wg).backward(g), grad_to_none=[qg, kg, vg, wg])
        except torch.OutOfMemoryError:
            row["ref_note"] = "reference OOM"
        torch.cuda.empty_cache()
    else:
        row["ref_note"] = "reference skipped (too slow / too much memory at this size)"
    # dense causal attention over the same tokens
    if with_sdpa:
        T = C * S
        qs, ks, vs = (torch.randn(B, H, T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        gs = torch.randn_like(qs)
        with torch.no_grad():
            row["sdpa_fwd_ms"] = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        row["sdpa_fwdbwd_ms"] = bench(
            lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(gs), grad_to_none=[qs, ks, vs]
        )
        del qs, ks, vs, gs
    del q, k, v, qg, kg, vg, wg, g
    torch.cuda.empty_cache()
    return row


def kernel_times(fn, reps=20, warmup=5):
    """GPU time of every kernel one call of ``fn`` launches (torch.profiler, mean of ``reps`` calls after
    ``warmup``): ``[(ms per call, launches per call, kernel name)]``, longest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.device_time_total / reps / 1e3, e.count // reps, e.key) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, reverse=True)


def profile_kernels(shape, reps: int = 20):
    """GPU time per kernel of forward + backward (the dq/dweights kernel, the dK/dV kernel, the
    inverted-index sort, ...), averaged over ``reps`` runs after a warm-up."""
    B, C, S, H, Hk, D, K = shape
    q, k, v, idx, w = make_inputs(B, C, S, H, Hk, D, K)
    qg, kg, vg, wg = (t.detach().requires_grad_(True) for t in (q, k, v, w))
    g = torch.randn_like(q)

    def fb():
        gt.gca_triton(qg, kg, vg, idx, wg, validate=False).backward(g)
        for t in (qg, kg, vg, wg):  # else every call after the first adds its gradients to .grad (3 extra kernels)
            t.grad = None

    rows = kernel_times(fb, reps)
    total = sum(r[0] for r in rows)
    print(f"per-kernel GPU time of one forward + backward at B={B} C={C} S={S} H={H} Hk={Hk} D={D} K={K} (mean of {reps}):")
    for ms, n, name in rows[:15]:
        print(f"  {ms:8.4f} ms  x{n:<3d} {name[:90]}")
    print(f"  {total:8.4f} ms  in all")


def bench_decode(peak_bw):
    """gca_decode at batch 1 (and 8): T query tokens of the current chunk against K retrieved chunks."""
    rows = []
    for B, T, K in ((1, 1, 8), (1, 64, 8), (8, 1, 8)):
        Cm, S, H, D = 1024, 64, 12, 64
        q = torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16)
        mk, mv = (torch.randn(B, Cm, S, H, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        idx = torch.stack([torch.randperm(Cm, device=DEVICE)[:K] for _ in range(B)])
        w = torch.softmax(torch.randn(B, K, device=DEVICE), -1)
        ms = bench(lambda: gt.gca_decode(q, mk, mv, idx, w, validate=False))
        # the GPU's time alone, as the model's CUDA-graph decoder runs it (the eager call is host-bound)
        graph_ms = triton.testing.do_bench_cudagraph(lambda: gt.gca_decode(q, mk, mv, idx, w, validate=False),
                                                     rep=50, return_mode="median")
        ref_ms = bench(lambda: gca_reference(q[:, None], mk, mv, idx[:, None], w[:, None]))
        by = 2 * B * K * S * H * D * 2 + 2 * B * T * H * D * 2
        rows.append({"B": B, "T": T, "K": K, "decode_ms": ms, "decode_graph_ms": graph_ms, "ref_ms": ref_ms,
                     "floor_ms": by / peak_bw * 1e3})
        print(f"  decode B={B} T={T:<3d} K={K}: {ms * 1e3:7.1f} us, graph {graph_ms * 1e3:6.1f} us  (reference "
              f"{ref_ms * 1e3:7.1f} us, bandwidth floor {by / peak_bw * 1e6:5.1f} us)")
    return rows


# Launch configs the sweep times per kernel (the other kernels at their defaults). Options measured
# slower on the H200 were removed (benchmarks/KERNEL_NOTES.md): two pairs per dK/dV tile, a fused
# 5-matmul backward, two slots per forward/dQ matmul (PAIR) and tensor-descriptor (TMA) loads; the
# plain (untransposed) dK/dV form (1.55 against 1.34 ms) is no longer swept.
SWEEP = {
    "dkdv": [dict(TRANSPOSED=True, num_warps=nw, num_stages=ns) for nw in (4, 8) for ns in (1, 2, 3)],
    "fwd": [dict(num_warps=nw, num_stages=ns) for nw in (4, 8) for ns in (2, 3, 4)],
    "dq": [dict(num_warps=nw, num_stages=ns) for nw in (4, 8) for ns in (2, 3)],
}


def cfg_keys(configs):
    return {k for cfgs in configs.values() for cfg in cfgs for k in cfg}


def sweep(kinds=tuple(SWEEP), out_path=None, configs=None, repeat=1, shape=(4, 256, 64, 12, 12, 64, 8)):
    """Time the launch configs in ``SWEEP`` (or ``configs``, same form) at the SPEC shape: the
    forward for "fwd", the whole backward (dq kernel, index sort, dK/dV kernel) for "dq" and "dkdv".
    Each config's results are compared with the default config's (relative max difference, "diff");
    a config that fails to compile or run (e.g. out of shared memory) is reported with ms = NaN and
    the sweep goes on. With ``repeat`` > 1 the configs of a kind are timed in turn that many times
    (so drift over the run hits them alike) and the median of the repeats is printed at the end.
    Rows are written to ``out_path`` after every config, so a timeout keeps what was measured.
    ``shape`` = (B, C, S, H, Hk, D, K), the SPEC shape by default."""
    configs = SWEEP if configs is None else configs
    B, C, S, H, Hk, D, K = shape
    q, k, v, idx, w = make_inputs(B, C, S, H, Hk, D, K)
    out, lse = gt.gca_fwd(q, k, v, idx, w)
    g = torch.randn_like(q)
    print(f"config sweep at B={B} C={C} S={S} H={H} Hk={Hk} D={D} K={K} (ms, median):")
    results = []
    keys = cfg_keys(configs)
    for kind in kinds:
        gt.CONFIG_OVERRIDES.clear()
        default = gt._config(kind, (H // Hk) * S, S, D, True)

        def run():
            return gt.gca_fwd(q, k, v, idx, w)[:1] if kind == "fwd" else gt.gca_bwd(g, q, k, v, idx, w, lse)

        expected = run()
        print(f"  {kind} default: {default}")
        for rep, cfg in [(r_, c_) for r_ in range(repeat) for c_ in configs[kind]]:
            gt.CONFIG_OVERRIDES.clear()
            gt.CONFIG_OVERRIDES[kind] = cfg
            row = {"kind": kind, **cfg, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "date": datetime.date.today().isoformat(), "rep": rep,
                   "shape": dict(zip("B C S H Hk D K".split(), shape))}
            try:
                row["diff"] = max(rel_err(a, e) for a, e in zip(run(), expected))
                row["ms"] = bench(run)
            except Exception as e:  # e.g. out of shared memory at compile time
                row["ms"] = float("nan")
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"  {kind:5s} {cfg}  skipped: {row['error']}", flush=True)
            else:
                flag = "  DIFFERS from the default config" if row["diff"] > 1e-2 else ""
                print(f"  {kind:5s} {cfg}  {'fwd' if kind == 'fwd' else 'bwd'} {row['ms']:.3f}  diff {row['diff']:.1e}{flag}", flush=True)
            results.append(row)
            if out_path:
                with open(out_path, "w") as fh:
                    json.dump(results, fh, indent=1)
        ok = [r for r in results if r["kind"] == kind and r["ms"] == r["ms"] and r["diff"] <= 1e-2]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(f"  {kind} fastest: {({k_: v_ for k_, v_ in best.items() if k_ in keys})} {best['ms']:.3f} ms")
        if repeat > 1:
            for cfg in configs[kind]:
                ms = sorted(r["ms"] for r in results if r["kind"] == kind and all(r.get(k_) == v_ for k_, v_ in cfg.items())
                            and set(cfg) == set(r) & keys and r["ms"] == r["ms"])
                if ms:
                    print(f"  {kind:5s} {cfg}  median of {len(ms)}: {ms[len(ms) // 2]:.3f} ms  (min {ms[0]:.3f}, max {ms[-1]:.3f})")
    gt.CONFIG_OVERRIDES.clear()
    return results


def versus(path, shape=(4, 256, 64, 12, 12, 64, 8), repeat=5, out_path=None):
    """A/B timing against another version of the kernels: ``path`` is a copy of
    ``gca/ops/gca_triton.py`` from another commit (e.g. ``git show 6b3d1bd:gca/ops/gca_triton.py >
    old.py``). The forward and the whole backward (``gca_fwd`` / ``gca_bwd``) of both are timed in
    turn ``repeat`` times at ``shape``, so drift over the run hits them alike; prints the medians and
    the relative max difference of their results."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gca_triton_versus", path)
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other  # Triton's JIT resolves a kernel's globals through its module
    spec.loader.exec_module(other)
    B, C, S, H, Hk, D, K = shape
    q, k, v, idx, w = make_inputs(B, C, S, H, Hk, D, K)
    g = torch.randn_like(q)
    mods = {"this": gt, "versus": other}
    lse = {n: m.gca_fwd(q, k, v, idx, w)[1] for n, m in mods.items()}
    fns = {(n, kind): (lambda m=m, n=n, kind=kind: m.gca_fwd(q, k, v, idx, w)[:1] if kind == "fwd"
                       else m.gca_bwd(g, q, k, v, idx, w, lse[n]))
           for n, m in mods.items() for kind in ("fwd", "bwd")}
    diff = {kind: max(rel_err(a, b) for a, b in zip(fns[("this", kind)](), fns[("versus", kind)]()))
            for kind in ("fwd", "bwd")}
    times = {key: [] for key in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            times[key].append(bench(fn))
    print(f"this tree against {path} at B={B} C={C} S={S} H={H} Hk={Hk} D={D} K={K} "
          f"(ms, median of {repeat} runs taken in turn):")
    rows = []
    for kind in ("fwd", "bwd"):
        med = {n: sorted(times[(n, kind)])[repeat // 2] for n in mods}
        print(f"  {kind}: this {med['this']:.3f}  versus {med['versus']:.3f}  ({med['this'] / med['versus'] - 1:+.1%})"
              f"  results differ by {diff[kind]:.1e}")
        rows.append({"kind": kind, "this_ms": med["this"], "versus_ms": med["versus"], "diff": diff[kind],
                     "this_all": times[("this", kind)], "versus_all": times[("versus", kind)], "versus_file": path,
                     "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                     "date": datetime.date.today().isoformat(), "shape": dict(zip("B C S H Hk D K".split(), shape))})
    if out_path:
        with open(out_path, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


def write_results(rows, out_dir, slug, gpu, date, peak_bw, ok):
    """JSON list + markdown table; rewritten after every case so a timeout keeps what was measured."""
    with open(os.path.join(out_dir, f"gca_{slug}.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    cmd = "PYTHONPATH=. python benchmarks/bench_gca.py " + " ".join(sys.argv[1:])
    md = [
        f"# GCA kernels on {gpu}, {date}",
        "",
        f"torch {torch.__version__}, Triton {triton.__version__}, bf16, S = Sm = 64, C = Cq = Cm chunks per sequence.",
        f"Command: `{cmd.strip()}`. Median of `triton.testing.do_bench` (eager calls; the graph columns: median of"
        f" `triton.testing.do_bench_cudagraph` over the launchers, without the host, the backward on one stream). Floor = max(FLOPs / {PEAK_FLOPS / 1e12:.0f} TFLOP/s,"
        f" bytes / {peak_bw / 1e12:.2f} TB/s measured copy bandwidth). Correctness check: {'OK' if ok else 'FAILED'}.",
        "",
        "| case | kernels | B | C | H | Hk | D | K | fwd ms | fwd+bwd ms | graph fwd ms | graph fwd+bwd ms | floor fwd ms | fwd TFLOP/s | ref fwd ms | ref fwd+bwd ms | SDPA causal fwd ms | SDPA fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["shape"]
        g = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        md.append(
            f"| {r['name']} | {r.get('kernel', 'triton')} | {s['B']} | {s['C']} | {s['H']} | {r['Hk']} | {s['D']} | {s['K']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
            f"{g('fwd_graph_ms')} | {g('fwdbwd_graph_ms')} | {r['floor_fwd_ms']:.3f} | {r['tflops_fwd']:.0f} | {g('ref_fwd_ms')} | {g('ref_fwdbwd_ms')} | {g('sdpa_fwd_ms')} | {g('sdpa_fwdbwd_ms')} |"
        )
    with open(os.path.join(out_dir, f"gca_{slug}.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true", help="the SPEC shape only")
    ap.add_argument("--sweep", action="store_true", help="also time launch configs at the SPEC shape")
    ap.add_argument("--sweep-only", action="store_true", help="only the launch-config sweep")
    ap.add_argument("--sweep-kinds", default=",".join(SWEEP),
                    help=f"kernels the sweep covers, in this order (default {','.join(SWEEP)})")
    ap.add_argument("--sweep-configs", default=None,
                    help='JSON {kind: [config, ...]} timed instead of the built-in sweep, e.g. \'{"fwd": [{}, {"num_stages": 3}]}\'')
    ap.add_argument("--sweep-repeat", type=int, default=1, help="time each kind's configs in turn this many times")
    ap.add_argument("--shape", default="4,256,64,12,12,64,8",
                    help="B,C,S,H,Hk,D,K of the sweep and of --profile-bwd (default: the SPEC shape)")
    ap.add_argument("--versus", default=None, metavar="FILE",
                    help="only: time this tree's forward and backward against FILE, a copy of gca/ops/gca_triton.py "
                         "from another commit, in turn --sweep-repeat times (default 5) at --shape")
    ap.add_argument("--cases", default=None, help="comma-separated names of the table's cases to run (default all)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--profile-bwd", action="store_true",
                    help="only: per-kernel GPU time of forward + backward at the SPEC shape (torch.profiler)")
    ap.add_argument("--override", default="{}",
                    help='JSON for gca_triton.CONFIG_OVERRIDES, e.g. \'{"dkdv": {"num_stages": 3}}\' (the sweep replaces it per config)')
    args = ap.parse_args()
    gt.CONFIG_OVERRIDES.update(json.loads(args.override))
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 7:
        sys.exit(f"--shape: expected 7 integers B,C,S,H,Hk,D,K, got {args.shape!r}")
    if not torch.cuda.is_available():
        sys.exit("bench_gca.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__}")
    peak_bw = measure_bandwidth()
    print(f"ceilings: {PEAK_FLOPS / 1e12:.0f} TFLOP/s (bf16 dense, SPEC.md), {peak_bw / 1e12:.2f} TB/s (measured copy)")

    os.makedirs(args.out_dir, exist_ok=True)
    if args.versus:
        repeat = args.sweep_repeat if args.sweep_repeat > 1 else 5
        versus(args.versus, shape, repeat, os.path.join(args.out_dir, f"gca_{slug}_versus.json"))
        return
    if args.profile_bwd:
        if gt.CONFIG_OVERRIDES:
            print(f"config overrides: {gt.CONFIG_OVERRIDES}")
        profile_kernels(shape)
        return
    configs = SWEEP if args.sweep_configs is None else json.loads(args.sweep_configs)
    kinds = [k for k in args.sweep_kinds.split(",") if k]
    if args.sweep_configs is not None and args.sweep_kinds == ",".join(SWEEP):
        kinds = list(configs)
    if not set(kinds) <= set(SWEEP) or not set(kinds) <= set(configs):
        sys.exit(f"--sweep-kinds: unknown kind in {','.join(kinds)!r} (known: {','.join(configs)})")
    sweep_path = os.path.join(args.out_dir, f"gca_{slug}_sweep.json")
    if args.sweep_only:
        sweep(kinds, sweep_path, configs, args.sweep_repeat, shape)
        return
    ok = True if args.no_check else correctness_check((4, 256, 64, 12, 12, 64, 8))

    cases = [  # name, B, C, S, H, Hk, D, K, with_ref
        ("spec", 4, 256, 64, 12, 12, 64, 8, True),
        ("K4", 4, 256, 64, 12, 12, 64, 4, True),
        ("K16", 4, 256, 64, 12, 12, 64, 16, True),
        ("D128-H6", 4, 256, 64, 6, 6, 128, 8, True),
        ("64K-tokens", 1, 1024, 64, 12, 12, 64, 8, True),
        ("grouped-H12-Hk4", 4, 256, 64, 12, 4, 64, 8, False),
    ]
    if args.quick:
        cases = cases[:1]
    if args.cases:
        want = args.cases.split(",")
        unknown = set(want) - {c[0] for c in cases}
        if unknown:
            sys.exit(f"--cases: unknown {sorted(unknown)} (known: {', '.join(c[0] for c in cases)})")
        cases = [c for c in cases if c[0] in want]
    rows = []
    date = datetime.date.today().isoformat()
    hdr = f"{'case':16s} {'B':>2} {'C':>5} {'H':>3} {'Hk':>3} {'D':>4} {'K':>3} | {'fwd':>7} {'fwd+bwd':>8} {'g fwd':>7} {'g f+b':>8} {'floor':>7} {'TFLOP/s':>7} | {'ref fwd':>8} {'ref f+b':>8} | {'sdpa fwd':>8} {'sdpa f+b':>8}"
    print(hdr)
    for name, B, C, S, H, Hk, D, K, with_ref in cases:
        r = run_case(name, B, C, S, H, Hk, D, K, peak_bw, with_ref=with_ref, with_sdpa=(Hk == H))
        rec = {
            "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "date": date,
            "shape": {"B": B, "C": C, "S": S, "H": H, "D": D, "K": K},
            "fwd_ms": round(r["fwd_ms"], 4), "fwdbwd_ms": round(r["fwdbwd_ms"], 4), "floor_fwd_ms": round(r["floor_fwd_ms"], 4),
        }
        rec.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in rec})
        rec["Hk"] = Hk
        rows.append(rec)

        def f(key, width=8):
            return f"{r[key]:{width}.3f}" if key in r else "-".rjust(width)

        print(
            f"{name:16s} {B:>2} {C:>5} {H:>3} {Hk:>3} {D:>4} {K:>3} | {r['fwd_ms']:7.3f} {r['fwdbwd_ms']:8.3f} "
            f"{f('fwd_graph_ms', 7)} {f('fwdbwd_graph_ms')} {r['floor_fwd_ms']:7.3f} {r['tflops_fwd']:7.0f} | {f('ref_fwd_ms')} {f('ref_fwdbwd_ms')} | {f('sdpa_fwd_ms')} {f('sdpa_fwdbwd_ms')}",
            flush=True,
        )
        write_results(rows, args.out_dir, slug, gpu, date, peak_bw, ok)
    print("decode (H=12, D=64, Sm=64, bf16):")
    dec = bench_decode(peak_bw)
    with open(os.path.join(args.out_dir, f"gca_{slug}.md"), "a") as fh:
        fh.write("\n## Decode (`gca_decode`, H = 12, D = 64, Sm = 64, bf16; graph: replayed from a CUDA graph, the GPU's time alone)\n\n"
                 "| B | T | K | decode us | graph us | reference us | bandwidth floor us |\n|---|---|---|---|---|---|---|\n")
        for d in dec:
            fh.write(f"| {d['B']} | {d['T']} | {d['K']} | {d['decode_ms'] * 1e3:.1f} | {d['decode_graph_ms'] * 1e3:.1f} | "
                     f"{d['ref_ms'] * 1e3:.1f} | {d['floor_ms'] * 1e3:.1f} |\n")
    if args.sweep:
        sweep(kinds, sweep_path, configs, args.sweep_repeat, shape)
    print(f"wrote {args.out_dir}/gca_{slug}.json and .md")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
