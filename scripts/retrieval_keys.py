"""Why a DRT's retrieval collapsed: how much its chunks' retrieval keys differ, and what dominates them.

    python scripts/retrieval_keys.py --ckpt runs/repro/drt --data data/debian-docs --seq-len 4032

Runs one held-out batch and prints (and with --out writes as JSON): the size of the chunk encoder's
output before its final norm and the share of its three largest features; how much the landmark keys
vary from chunk to chunk relative to their size (near 0: every chunk has the same key); the spread of
the retrieval scores per row; and the same two numbers for keys centred on their chunk's mean
(normalised with the encoder's output norm: a what-if for a published-key checkpoint, close to what
``retrieval_key="centered"`` computes), which shows whether the chunks' content is still there under a
component shared by every position.
"""

from __future__ import annotations

import argparse
import json

import torch

from gca.data import build_source
from gca.eval.cli import check_data_tokenizer, load_for_eval


def _rel_spread(k: torch.Tensor) -> float:
    """std across chunks of (B, C, d) keys, relative to their rms."""
    return ((k - k.mean(1, keepdim=True)).pow(2).mean().sqrt() / k.pow(2).mean().sqrt()).item()


def _row_spread(q: torch.Tensor, k: torch.Tensor, first: int = 8) -> float:
    s = torch.einsum("bcd,bmd->bcm", q, k) / q.shape[-1] ** 0.5
    return torch.stack([s[:, c, :c].std(-1) for c in range(first, s.shape[1])], -1).mean().item()


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="a prepared folder: its val split is read")
    p.add_argument("--seq-len", type=int, default=4032)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out", default=None, help="write the numbers here as JSON")
    a = p.parse_args()
    m, _, tok = load_for_eval(a.ckpt, "cpu", "float32")
    if m.config.arch != "drt":
        raise SystemExit(f"{a.ckpt} is a {m.config.arch!r} model: no retrieval to inspect")
    try:
        check_data_tokenizer(tok, a.data, "--data")
    except ValueError as e:
        p.error(str(e))
    P = m.config.text_per_chunk
    if a.seq_len <= 8 * P:  # _row_spread reads the rows past the first 8 chunks
        p.error(f"--seq-len {a.seq_len} makes at most 8 chunks of {P} tokens: give more than {8 * P}")
    ids = build_source(a.data, seq_len=a.seq_len, seed=3, split="val").get_batch(0, a.batch_size, 0, 1)["input_ids"]
    cap = {}
    enc = m.encoder
    S = m.config.chunk_size

    def keep(name, value):  # hooks must return None, or they replace what they see
        cap.setdefault(name, value)

    # the encoder's output before its norm: the last encoder layer's (norm_out also sees the landmark
    # slice alone, and with center_memory the centred output, so its input is not it)
    last = enc.layers[-1] if len(enc.layers) else enc.norm_in
    hooks = [
        last.register_forward_hook(lambda mod, args, out: keep("x", out)),
        enc.register_forward_hook(lambda mod, args, out: keep("lmk", out[0])),
        m.retr_norms[0].register_forward_hook(lambda mod, args, out: keep("q", out)),
    ]
    m(ids)
    for h in hooks:
        h.remove()
    x = cap["x"].reshape(ids.shape[0], -1, S, cap["x"].shape[-1])  # encoder output before its norm
    energy = x.pow(2).mean((0, 1, 2))
    q, lmk = cap["q"], cap["lmk"]
    centred = enc.norm_out(x[:, :, -1] - x.mean(2))
    res = {
        "ckpt": a.ckpt,
        "retrieval_key": m.config.retrieval_key,
        "encoder_out_rms": round(x.pow(2).mean().sqrt().item(), 3),
        "encoder_out_top3_feature_share": round((energy.topk(3).values.sum() / energy.sum()).item(), 4),
        "key_chunk_spread_rel": round(_rel_spread(lmk), 6),
        "query_chunk_spread_rel": round(_rel_spread(q), 6),
        "score_row_spread": round(_row_spread(q, lmk), 6),
        "centred_key_chunk_spread_rel": round(_rel_spread(centred), 6),
        "centred_key_score_row_spread": round(_row_spread(q, centred), 6),
    }
    for k, v in res.items():
        print(f"{k:32s} {v}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    from gca.cli import run_script  # missing files, bad input: one line

    run_script(main, "retrieval_keys.py")
