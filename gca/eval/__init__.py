"""eval of DRT models."""

import functools
import math


def keeps_mode(fn):
    """Run ``fn(model, ...)`` with the model in eval mode and give it back in the mode it came in (an
    evaluation in the middle of training must not leave it without dropout or Gumbel noise)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        model = args[0] if args else kwargs["model"]
        was_training = model.training
        model.eval()
        try:
            return fn(*args, **kwargs)
        finally:
            model.train(was_training)

    return wrapper


def strict_rows(rows: list[dict]) -> list[dict]:
    """Result rows ready for strict JSON (``json.dumps(..., allow_nan=False)``; most JSON readers refuse
    ``Infinity`` / ``NaN``): a non-finite number becomes null, named in the row's ``nonfinite`` (field ->
    "inf", "-inf" or "nan"). :func:`from_strict` reverses it."""

    def strict(row):
        bad = {k: str(v) for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        return dict(row, **{k: None for k in bad}, nonfinite=bad) if bad else row

    return [strict(r) for r in rows]


def from_strict(row: dict) -> dict:
    """A row written by way of :func:`strict_rows` with its non-finite values back as floats (in place)."""
    for k, v in (row.get("nonfinite") or {}).items():
        if row.get(k) is None:
            row[k] = float(v)
    return row
