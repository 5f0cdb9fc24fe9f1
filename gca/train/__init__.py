"""Training: :func:`train` with a :class:`TrainConfig`, checkpoints, and :func:`load_model` for eval/demo code.

    from gca.train import TrainConfig, train, load_model
    train(TrainConfig(preset="tiny", data="synthetic:passkey", seq_len=504, max_steps=200, out="runs/t"))
    model = load_model("runs/t")

The command-line form is ``gca train`` (see ``gca train --help`` and :mod:`gca.train.trainer`).
"""

from gca.train.checkpoint import CheckpointError, export_model, load_model, read_checkpoint, save_checkpoint, save_model
from gca.train.schedule import lr_at
from gca.train.trainer import TrainConfig, TrainResult, train

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "export_model",
    "load_model",
    "lr_at",
    "read_checkpoint",
    "save_checkpoint",
    "save_model",
    "train",
]
