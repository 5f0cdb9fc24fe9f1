"""Finding where a non-finite gradient comes from.

When a training step's gradient is NaN or inf the trainer skips the update and keeps what it takes
to reproduce the step in ``DIR/nonfinite/``:

    DIR/nonfinite/step<N>_rank<r>.pt   the step's batch (input ids, labels; every micro-batch of a
                                       --grad-accum step, in order) and its loss, first five steps
    DIR/nonfinite/step<N>/             the weights that gave the first one (``model.safetensors`` and
                                       ``config.json``: a checkpoint folder ``load_model`` reads)

:func:`replay_nonfinite` (``gca replay-nonfinite DIR``) runs that batch through those weights again,
forward and backward as training does (train mode, bf16 autocast on CUDA, one micro-batch after the
other, each loss weighted by its share of the labelled tokens), under PyTorch's anomaly
detection: it names the backward function that first returned a non-finite value, the model code
that made it in the forward, and the parameters whose gradients end non-finite. Training-time noise
(Gumbel noise on retrieval scores) is drawn afresh, so a failure that depends on one draw may not
come back; one that comes from the weights does.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["nonfinite_parameters", "save_nonfinite_weights", "replay_nonfinite", "format_report"]

NONFINITE = "nonfinite"


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose ``.grad`` holds a NaN or inf, in the model's order."""
    with_grad = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None and p.grad.dtype.is_floating_point]
    if not with_grad:
        return []
    ok = torch.stack([g.isfinite().all() for _, g in with_grad]).tolist()  # one host synchronisation for all
    return [n for (n, _), good in zip(with_grad, ok) if not good]


def save_nonfinite_weights(model: torch.nn.Module, out: str | os.PathLike, step: int) -> Path | None:
    """Write the weights of ``model`` (unwrapped) to ``out/nonfinite/step<step>/`` unless a previous
    step's are there already (only the first failure's are kept: a model's weights can be large).
    Atomic: written to a temporary folder, then renamed. Returns the folder, or None if skipped."""
    from safetensors.torch import save_model

    from gca.train.checkpoint import CONFIG, WEIGHTS

    d = Path(out) / NONFINITE
    if d.exists() and any(p.is_dir() and re.fullmatch(r"step\d+", p.name) for p in d.iterdir()):
        return None
    final, tmp = d / f"step{step}", d / f".step{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(model.config.to_json())
    os.replace(tmp, final)
    return final


def _pick_step(d: Path, step: int | None) -> int:
    saved = sorted(int(p.name[4:]) for p in d.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name)) if d.exists() else []
    if not d.exists() and not any((d.parent / n).exists() for n in ("log.jsonl", "ckpt", "checkpoint.json")):
        raise FileNotFoundError(f"{d.parent} is not a gca training run (no log.jsonl, no ckpt/): give the --out of a "
                                f"gca train run")
    if not d.exists():  # the usual case: a healthy run
        raise FileNotFoundError(
            f"{d.parent} has no {d.name}/ folder: none of its steps had a non-finite gradient, so there is nothing to "
            "replay (the trainer saves the weights and batch of such a step in DIR/nonfinite/step<N>/)"
        )
    if not saved:
        raise FileNotFoundError(
            f"no saved weights in {d}: the trainer keeps them (DIR/nonfinite/step<N>/) from the first step whose "
            "gradient was not finite; runs from before that have the batches only"
        )
    if step is None:
        return saved[0]
    if step not in saved:
        raise FileNotFoundError(f"no weights for step {step} in {d} (saved: {', '.join(f'step{s}' for s in saved)})")
    return step


def _model_frames(stack: str) -> list[str]:
    """The frames of a forward traceback outside PyTorch (the model's code, and any code that wraps it),
    innermost last, as 'file:line in function: code'; files in this package relative to its parent."""
    torch_dir = str(Path(torch.__file__).resolve().parent)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    out = []
    for filename, lineno, name, code in re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', stack):
        path = str(Path(filename).resolve())
        if path.startswith(torch_dir):
            continue
        shown = os.path.relpath(path, pkg_parent) if path.startswith(pkg_parent) else path
        out.append(f"{shown}:{lineno} in {name}: {code.strip()}")
    return out


def replay_nonfinite(
    run: str | os.PathLike,
    step: int | None = None,
    device: str = "auto",
    bf16: bool = True,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a saved non-finite step again (see the module docstring).

    Args:
        run: the training run's folder (``gca train --out DIR``).
        step: which saved step (default: the first, the one whose weights were kept).
        device: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``.
        bf16: bf16 autocast on CUDA, as ``gca train`` trains by default (``--no-bf16`` there: pass False).
        seed: seed of the training-time noise.
        overrides: model config fields to change first, e.g. ``{"gca_impl": "torch"}`` to see whether the
            failure follows a backend (fields that change the parameters cannot load the saved weights).
    Returns:
        ``{"step", "loss", "finite_loss", "reproduced", "nonfinite_parameters", "anomaly", "forward_frames"}``:
        ``reproduced`` is whether the gradient came out non-finite again, ``anomaly`` the first line of the
        anomaly detector's error (which backward function returned NaN / inf; None if none did), and
        ``forward_frames`` the frames (outside PyTorch) of the forward call that created that function.
    """
    from gca.model import DRT, labelled_tokens
    from gca.train.checkpoint import load_weights, read_config

    if not Path(run).is_dir():
        raise FileNotFoundError(f"{run}: no such run folder (give the --out folder of a `gca train` run)")
    d = Path(run) / NONFINITE
    step = _pick_step(d, step)
    batch_path = d / f"step{step}_rank0.pt"
    if not batch_path.exists():
        raise FileNotFoundError(f"{batch_path} is missing: the weights of step {step} are there but not its batch")
    batch = torch.load(batch_path, map_location="cpu", weights_only=True)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    cfg = read_config(d / f"step{step}")
    model = DRT(cfg.replace(**overrides) if overrides else cfg)
    load_weights(model, d / f"step{step}", dev)
    model = model.to(dev).train()
    ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
    micro = int(batch.get("micro_batches", 1))  # (dumps from before the trainer kept them all: the last one)

    def run_once() -> torch.Tensor:
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and bf16 else contextlib.nullcontext()
        total = torch.zeros((), device=dev)
        parts = list(zip(ids.chunk(micro), labels.chunk(micro)))
        counts = [labelled_tokens(lab) for _, lab in parts]
        for (i, lab), n in zip(parts, counts):
            # weighted by its share of the labelled tokens, as training weighs it (this rank's tokens: the
            # dump holds no other); a micro-batch without labels adds nothing (its mean loss is NaN)
            share = n / sum(counts) if sum(counts) else 1.0 / micro
            with ctx:
                loss = model(i, lab).loss * share
            loss.backward()
            if n:
                total += loss.detach().float()
        return total

    # first without anomaly mode: every gradient is computed, so the bad parameters can be listed
    loss = run_once()
    bad = nonfinite_parameters(model)
    anomaly, frames = None, []
    if bad or not torch.isfinite(loss):
        with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly(check_nan=True):
            warnings.simplefilter("always")
            try:
                run_once()
            except RuntimeError as e:
                anomaly = str(e).strip().splitlines()[0]
        for w in caught:  # anomaly mode warns with the forward traceback of the failing function
            if "Traceback of forward call" in str(w.message):
                frames = _model_frames(str(w.message))
    return {
        "step": step,
        "loss": float(loss),
        "finite_loss": bool(torch.isfinite(loss)),
        "reproduced": bool(bad) or not bool(torch.isfinite(loss)),
        "nonfinite_parameters": bad,
        "anomaly": anomaly,
        "forward_frames": frames,
    }


def format_report(r: dict[str, Any], limit: int = 12) -> str:
    """:func:`replay_nonfinite`'s result as lines for a terminal."""
    lines = [f"step {r['step']}: loss {r['loss']:.6g} ({'finite' if r['finite_loss'] else 'NOT finite'})"]
    if not r["reproduced"]:
        lines.append("every gradient is finite this time: the failure did not come back (it may have needed the "
                     "training-time noise of that step, or another rank's batch)")
        return "\n".join(lines)
    bad = r["nonfinite_parameters"]
    lines.append(f"{len(bad)} parameter(s) with a non-finite gradient: {', '.join(bad[:limit])}"
                 + (f", ... ({len(bad) - limit} more)" if len(bad) > limit else ""))
    if r["anomaly"]:
        lines.append(f"first backward function with a non-finite output: {r['anomaly']}")
    if r["forward_frames"]:
        lines.append("made in the forward at (innermost last):")
        lines += [f"  {f}" for f in r["forward_frames"][-6:]]
    return "\n".join(lines)
