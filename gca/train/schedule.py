"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr`` (the paper: 2e-3 -> 4e-4, 2% warm-up).

The rate is a pure function of the step, so a resumed run needs no scheduler state beyond the step.
"""

from __future__ import annotations

import math


def warmup_steps(max_steps: int, warmup: float) -> int:
    """Warm-up length in steps for a warm-up given as a fraction of ``max_steps``."""
    return int(round(warmup * max_steps))


def lr_at(step: int, *, lr: float, min_lr: float, max_steps: int, warmup: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Steps ``0 .. W-1`` ramp linearly up to ``lr`` (W = round(warmup * max_steps)); the remaining steps
    follow half a cosine from ``lr`` down to ``min_lr``, reached at the last step ``max_steps - 1`` (also
    when the warm-up leaves that step alone after it; steps past the run stay at ``min_lr``).
    """
    w = warmup_steps(max_steps, warmup)
    if step < w:
        return lr * (step + 1) / w
    decay = max_steps - 1 - w
    if decay <= 0:  # no room for the cosine: the step after the warm-up is the last one
        return min_lr
    t = min(1.0, (step - w) / decay)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))
