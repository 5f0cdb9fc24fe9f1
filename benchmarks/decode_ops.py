"""Host overhead of one decoding step: torch calls per token, by the gca function that makes them.

    PYTHONPATH=. python benchmarks/decode_ops.py --preset small --context 4096 --tokens 20

At batch 1 a decoded token costs a few hundred small launches and far less GPU work (README,
"Kernels and speed"), so the count of torch calls per token is the number to bring down; this
counts them on any device (a ``TorchFunctionMode``; views and reshapes included, so it is an upper
bound on kernel launches) and times the step. ``--skip-gca-ref``: leave out the calls of the
reference GCA op, which a CPU runs and a GPU replaces by one Triton decode kernel.
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback

import torch
from torch.overrides import TorchFunctionMode

from gca import DRT, DRTConfig

_IGNORED = {"__get__", "dim", "size", "numel", "__len__", "is_floating_point"}


class _Count(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name not in _IGNORED:
            frames = [f for f in traceback.extract_stack(limit=12) if "/gca/" in f.filename.replace("\\", "/")]
            where = f"{frames[-1].filename.replace(chr(92), '/').split('/gca/')[-1]}:{frames[-1].name}" if frames else "?"
            self.calls[where] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--arch", default="drt", choices=["drt", "swa", "full"])
    p.add_argument("--context", type=int, default=4096, help="tokens prefilled before decoding")
    p.add_argument("--tokens", type=int, default=20, help="decoding steps counted and timed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-gca-ref", action="store_true", help="leave out the reference GCA op's calls")
    a = p.parse_args()
    torch.manual_seed(0)
    m = DRT(DRTConfig.from_preset(a.preset, vocab_size=2048, arch=a.arch)).to(a.device).eval()
    cache = m.new_cache(1, max_tokens=a.context + 2 * a.tokens + 8)
    tok = torch.randint(0, 2048, (1, 1), device=a.device)
    with torch.no_grad():
        m(torch.randint(0, 2048, (1, a.context), device=a.device), cache=cache, logits_to_keep=1)
        for _ in range(3):
            m(tok, cache=cache)
        sync = torch.cuda.synchronize if str(a.device).startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(a.tokens):
            m(tok, cache=cache)
        sync()
        ms = (time.perf_counter() - t0) / a.tokens * 1e3
        count = _Count()
        with count:
            for _ in range(a.tokens):
                m(tok, cache=cache)
    calls = {k: v / a.tokens for k, v in count.calls.items() if not (a.skip_gca_ref and k.startswith("ops/gca_ref"))}
    print(f"{a.preset} {a.arch} on {a.device}, after {a.context} tokens: {ms:.2f} ms a decoded token, "
          f"{sum(calls.values()):.0f} torch calls a token{' (reference GCA left out)' if a.skip_gca_ref else ''}")
    for where, n in sorted(calls.items(), key=lambda kv: -kv[1])[:15]:
        print(f"{n:8.1f}  {where}")


if __name__ == "__main__":
    main()
