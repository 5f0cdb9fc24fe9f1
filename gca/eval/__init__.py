"""eval of DRT models."""

import functools


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
