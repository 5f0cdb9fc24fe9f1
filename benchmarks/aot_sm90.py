"""Compile the GCA kernels for Hopper (sm_90a) on a machine without a GPU, and report what ptxas says.

The launchers run on CPU tensors with each ``@triton.jit`` kernel swapped for a stand-in that
specialises the arguments exactly as a real launch would (strides equal to 1, divisibility by 16),
compiles for the target and prints shared memory, registers and spills, then returns without
launching. This catches compile errors and register spills before any GPU time is spent.

    python benchmarks/aot_sm90.py                  # the SPEC shape and a few variants
    python benchmarks/aot_sm90.py --dump /tmp/ptx  # also write the PTX

Each line: shared memory, registers, spills, wgmma and vector-load counts in the PTX, and
``loop_sass``: the SASS instructions of one iteration of the kernel's main loop (what every warp
issues per slot / retrieving pair; "-" when the loop was unrolled), and a warning when ptxas
serialises the wgmma instructions (C75xx, e.g. C7515: other instructions write accumulator registers
inside a wgmma pipeline stage; C7513: they define a wgmma's input registers there), which costs far
more than it saves.

Do not set TRITON_INTERPRET. Triton's bundled ptxas is used.
"""

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature

from gca.ops import gca_triton as gt

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
CUOBJDUMP = os.path.join(os.path.dirname(PTXAS), "cuobjdump")


def _loop_instructions(cubin: str) -> str:
    """SASS instructions between each conditional backward branch and its target (the main loop's
    body, one iteration), e.g. "344"; "-" when the loop was unrolled away. From the bundled cuobjdump.
    Not counted: mbarrier wait spins (a branch back over one or two instructions) and the unconditional
    branches by which out-of-line wait stubs return into the body (Gluon kernels have both)."""
    sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True).stdout
    addrs, loops = [], []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if not m:
            continue
        a = int(m.group(1), 16)
        addrs.append(a)
        t = re.search(r"0x([0-9a-f]+)", m.group(4)) if m.group(3) == "BRA" else None
        if t and m.group(2) and int(t.group(1), 16) < a - 0x10:
            loops.append((int(t.group(1), 16), a))
    return ",".join(str(sum(lo <= a <= hi for a in addrs)) for lo, hi in loops) or "-"


class _Stub:
    """Stands in for a JITFunction (Triton or Gluon): `stub[grid](*args, **kw)` compiles for TARGET and
    reports (`wait_group`: the PTX's wgmma waits in order, how many groups each leaves in flight)."""

    count = 0

    def __init__(self, fn, label, dump):
        self.fn, self.label, self.dump = fn, label, dump

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            fn = self.fn
            backend = make_backend(TARGET)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
            source = ASTSource
            if getattr(fn, "is_gluon", lambda: False)():
                from triton.experimental.gluon._runtime import GluonASTSource as source
            k = compile(source(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
            ptx = k.asm["ptx"]
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            cubin = f.name[:-4] + ".cubin"
            out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", cubin], capture_output=True, text=True)
            os.unlink(f.name)
            loop = _loop_instructions(cubin)
            os.unlink(cubin)
            regs = re.search(r"Used (\d+) registers", out.stderr)
            spill = re.search(r"(\d+) bytes spill stores", out.stderr)
            cfg = {k_: kwargs[k_] for k_ in ("BLOCK_M", "num_warps", "num_stages") if k_ in kwargs}
            waits = re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx)
            codes = sorted(set(re.findall(r"C75\d\d", out.stderr)))
            print(
                f"  {self.label:5s} grid={tuple(grid)} {cfg} smem={k.metadata.shared} "
                f"regs={regs.group(1) if regs else '?'} spill={spill.group(1) if spill else '?'}B "
                f"wgmma={ptx.count('wgmma.mma_async')} vec_ld={len(re.findall(r'ld.global[.a-z0-9:]*v[248]', ptx))} "
                f"wait_group={','.join(waits) or '-'} loop_sass={loop}"
                + (f"  WGMMA SERIALIZED (ptxas {', '.join(codes)})" if codes else "")
            )
            if self.dump:
                os.makedirs(self.dump, exist_ok=True)
                _Stub.count += 1
                with open(os.path.join(self.dump, f"{_Stub.count:02d}_{self.label}.ptx"), "w") as f:
                    f.write(ptx)

        return launch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", default=None, help="folder for the PTX files")
    ap.add_argument("--override", default="{}", help='JSON for gca_triton.CONFIG_OVERRIDES, e.g. \'{"dkdv": {"num_stages": 3}}\'')
    ap.add_argument("--only", type=int, default=None, help="index of one shape to compile")
    args = ap.parse_args()
    gt.CONFIG_OVERRIDES.update(json.loads(args.override))
    assert not gt.INTERPRET, "unset TRITON_INTERPRET"
    config = gt._config
    gt._config = lambda kind, R, Sm, D, on_cuda: config(kind, R, Sm, D, True)  # the GPU configs
    gt._gca_fwd_kernel = _Stub(gt._gca_fwd_kernel, "fwd", args.dump)
    gt._gca_bwd_dq_kernel = _Stub(gt._gca_bwd_dq_kernel, "dq", args.dump)
    gt._gca_bwd_dkdv_kernel = _Stub(gt._gca_bwd_dkdv_kernel, "dkdv", args.dump)
    shapes = [  # (S, Sm, H, Hk, D, K)
        (64, 64, 12, 12, 64, 8),
        (64, 64, 6, 6, 128, 8),
        (128, 128, 6, 2, 128, 8),
        (48, 48, 4, 1, 64, 4),
        (64, 64, 12, 12, 64, 4),
    ]
    for S, Sm, H, Hk, D, K in shapes if args.only is None else [shapes[args.only]]:
        print(f"S={S} Sm={Sm} H={H} Hk={Hk} D={D} K={K} bf16")
        B, C = 1, 4
        q = torch.randn(B, C, S, H, D, dtype=torch.bfloat16)
        kv = torch.randn(B, C, Sm, Hk, D, dtype=torch.bfloat16)
        idx = torch.zeros(B, C, K, dtype=torch.long)
        w = torch.rand(B, C, K)
        lse = torch.zeros(B, C, H, K, S)
        gt.gca_fwd(q, kv, kv, idx, w)
        gt.gca_bwd(q, q, kv, kv, idx, w, lse)
        gt.gca_fwd(q[:, :1], kv, kv, idx[:, :1], w[:, :1], nsplit=K, store_lse=False)


if __name__ == "__main__":
    main()
