"""Checkpoints: written atomically, verified on load, and :func:`load_model` for eval and demo code.

Layout of a run directory ``DIR`` (``gca train --out DIR``)::

    DIR/ckpt/model.safetensors   weights (tied embeddings stored once)
    DIR/ckpt/config.json         the resolved DRTConfig: DRT(DRTConfig.from_dict(...)) rebuilds the model
    DIR/ckpt/train_config.json   the TrainConfig of the run
    DIR/ckpt/trainer.pt          optimizer state, step, tokens, elapsed time, every rank's RNG states,
                                 the steps skipped for a non-finite gradient
    DIR/ckpt/tokenizer*          a copy of the data source's tokenizer, when it has one
    DIR/ckpt/checkpoint.json     manifest (step, each file's size and sha256), written last

Atomicity: a checkpoint is written into ``DIR/ckpt.tmp``, every file is fsync'ed, then
``DIR/ckpt -> DIR/ckpt.old``, ``DIR/ckpt.tmp -> DIR/ckpt`` and ``DIR/ckpt.old`` is removed. A crash at
any point leaves either the previous or the new checkpoint complete: an unfinished ``ckpt.tmp`` is
ignored, and a crash between the two renames is repaired on the next load by moving ``ckpt.old``
back. The manifest's file sizes catch files truncated by other means (a full disk, a copy cut short),
its sha256 sums bytes damaged in place (checked on every load; manifests written before the sums
existed are checked by size alone).

A model folder of :func:`save_model` / :func:`export_model` (``model.safetensors``, ``config.json``, and
``tokenizer.json`` / ``train_config.json`` when present) has a manifest of its own, ``manifest.json``
(each file's size and sha256, written last), checked by every model load the same way. It is not
``checkpoint.json``: such a folder is no training run to resume (and gca versions before it read the
folder as they did). A folder without it (saved before, or assembled by hand) is read unchecked.

    model = load_model("runs/tiny")              # a run directory or its ckpt/ folder
    model = load_model("runs/tiny", device="cuda")
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from gca.config import DRTConfig
from gca.model import DRT

CKPT, TMP, OLD = "ckpt", "ckpt.tmp", "ckpt.old"
MANIFEST = "checkpoint.json"
MODEL_MANIFEST = "manifest.json"  # of a save_model / export_model folder
WEIGHTS, CONFIG, TRAIN_CONFIG, TRAINER = "model.safetensors", "config.json", "train_config.json", "trainer.pt"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and what to do."""


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found: ``config`` (DRTConfig), ``train_config`` (dict),
    ``trainer`` (the ``trainer.pt`` dict, or None when not asked for) and ``step``."""

    path: Path
    step: int
    config: DRTConfig
    train_config: dict[str, Any]
    trainer: dict[str, Any] | None


# ---- writing ----
def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    out: str | os.PathLike,
    *,
    model: DRT,
    train_config: dict[str, Any],
    trainer: dict[str, Any],
    tokenizer: Any = None,
) -> Path:
    """Atomically replace ``out/ckpt`` with a checkpoint of ``model`` (unwrapped: not DDP or compiled)
    and the trainer state ``trainer`` (must hold ``step``). Returns the checkpoint directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp, final, old = out / TMP, out / CKPT, out / OLD
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash: never complete, or already superseded
    tmp.mkdir()
    _st_save_model(model, str(tmp / WEIGHTS))  # drops duplicate names of shared (tied) tensors
    _write_json(tmp / CONFIG, model.config.to_dict())
    _write_json(tmp / TRAIN_CONFIG, train_config)
    torch.save(trainer, tmp / TRAINER)
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp)
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            _fsync_file(p)
            files[p.relative_to(tmp).as_posix()] = p.stat().st_size
    sums = _sha256s(tmp, files)
    manifest = {"format": FORMAT, "step": int(trainer["step"]), "files": files, "sha256": sums}
    _write_json(tmp / MANIFEST, manifest)
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    # the rename dance: at every instant either ckpt/ or ckpt.old/ is a complete checkpoint
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        _fsync_dir(out)
    os.replace(tmp, final)
    _fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Save a data source's tokenizer into a checkpoint directory (as ``tokenizer.json``)."""
    tokenizer.save(str(directory / "tokenizer.json"))


# ---- finding and reading ----
def find_checkpoint(out: str | os.PathLike, repair: bool = True) -> Path | None:
    """The checkpoint directory of run ``out`` (or ``out`` itself if it is one), or None if the run has none.

    With ``repair``, a crash between the two renames of a save (``ckpt/`` gone, ``ckpt.old/`` complete)
    is undone by moving ``ckpt.old`` back.
    """
    out = Path(out)
    if (out / MANIFEST).exists() or (out / WEIGHTS).exists():
        return out
    final, old = out / CKPT, out / OLD
    if final.exists():
        return final
    if old.exists() and (old / MANIFEST).exists():
        if not repair:
            return old
        os.replace(old, final)
        _fsync_dir(out)
        return final
    return None


def _corrupt(path: Path, what: str, ckpt: Path, resume: bool = False) -> CheckpointError:
    """The one-line error for a damaged file ``path`` of the checkpoint (or saved model) ``ckpt``. What to
    do depends on the load: deleting the checkpoint to start over is advice for a training run being
    resumed (``resume``) only; a model load (generate, eval, export, ``--init-from``) is told to restore
    the file, or for a saved or exported model folder, to export or download it again."""
    if resume:
        return CheckpointError(
            f"corrupt checkpoint: {path} {what}. The checkpoint in {ckpt} cannot be used; restore it from a "
            f"backup, or delete {ckpt} to start this run from scratch (rows of log.jsonl past the new run's "
            f"steps are rewritten)."
        )
    if (ckpt / MANIFEST).exists() or ckpt.name in (CKPT, OLD):  # a training run's checkpoint
        fix = "restore it from a backup or from another copy of the run"
    else:  # a folder of save_model / export_model
        fix = (f"restore {path.name} from a backup or from the copy it came from, or export (gca.train.export_model) "
               f"or download the model again")
    return CheckpointError(f"corrupt checkpoint: {path} {what}. The model in {ckpt} cannot be loaded; {fix}.")


def _first_line(e: BaseException) -> str:
    """``TypeName: the first line of the message``: torch's unpickling errors run to a paragraph, and
    an error of ``gca`` is one line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _sha256s(folder: Path, names) -> dict[str, str]:
    """``{name: sha256}`` of the files ``folder / name``, hashed side by side (hashlib lets go of the GIL):
    ~1 GB/s a core, so the weights and the optimizer state of a large model take the larger one's time."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=min(4, len(names) or 1)) as ex:
        return dict(zip(names, ex.map(lambda n: _sha256(folder / n), names)))


def verify_checkpoint(ckpt: Path, with_trainer: bool = True) -> dict[str, Any]:
    """Check the manifest and that every file it lists exists with its recorded size and sha256; return
    the manifest. The trainer state (``trainer.pt``) only ``with_trainer`` (resuming a run): a model load
    does not read it, so a missing or damaged one is no reason to refuse the weights."""
    mpath = ckpt / MANIFEST
    resume = with_trainer  # (only a resumed run reads the trainer state: the errors' advice is for one)
    if not mpath.exists():
        raise _corrupt(mpath, "is missing (the checkpoint was not written by `gca train`, or was cut short)", ckpt, resume)
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        step = int(manifest["step"])
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}, not a mapping of names to sizes")
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(mpath, f"is not a valid manifest ({e})", ckpt, resume) from None
    required = (WEIGHTS, CONFIG, TRAIN_CONFIG) + ((TRAINER,) if with_trainer else ())
    sums = manifest.get("sha256") or {}  # (absent from manifests written before the sums existed)
    skip = () if with_trainer else (TRAINER,)
    _check_files(ckpt, files, sums, required, skip, resume)
    manifest["step"] = step
    return manifest


def _check_files(ckpt: Path, files: dict, sums: dict, required, skip=(), resume: bool = False) -> None:
    """Every file a manifest lists (``files``: name -> size, ``sums``: name -> sha256) but those in
    ``skip`` exists with its size and sum; the names in ``required`` are listed."""
    for name in required:
        if name not in files:
            raise _corrupt(ckpt / name, "is not listed in the manifest", ckpt, resume)
    for name, size in files.items():
        if name in skip:
            continue
        p = ckpt / name
        if not p.is_file():
            raise _corrupt(p, "is missing", ckpt, resume)
        actual = p.stat().st_size
        if actual != size:
            raise _corrupt(p, f"is truncated or altered ({actual} bytes, the manifest says {size})", ckpt, resume)
    sums = {k: v for k, v in sums.items() if k not in skip and (ckpt / k).is_file()}
    for name, digest in _sha256s(ckpt, sums).items():
        if digest != sums[name]:
            raise _corrupt(ckpt / name, "is damaged: its bytes do not match the manifest's sha256", ckpt, resume)


def _write_model_manifest(out: Path, names) -> None:
    """Write ``out/manifest.json``: the size and sha256 of each of the files ``names`` of a saved model."""
    files = {n: (out / n).stat().st_size for n in names}
    tmp = out / (MODEL_MANIFEST + ".tmp")
    _write_json(tmp, {"format": FORMAT, "files": files, "sha256": _sha256s(out, files)})
    os.replace(tmp, out / MODEL_MANIFEST)


def _verify_model_manifest(ckpt: Path) -> None:
    """Check the files of a saved model folder against its ``manifest.json``."""
    mpath = ckpt / MODEL_MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files, sums = manifest["files"], manifest.get("sha256") or {}
        if not isinstance(files, dict) or not isinstance(sums, dict):
            raise TypeError("'files' and 'sha256' must be mappings of file names")
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(mpath, f"is not a valid manifest ({e})", ckpt) from None
    _check_files(ckpt, files, sums, (WEIGHTS, CONFIG))


def _read_json(path: Path, ckpt: Path, resume: bool = False) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise _corrupt(path, "is missing", ckpt, resume) from None
    except ValueError as e:
        raise _corrupt(path, f"is not valid JSON ({e})", ckpt, resume) from None


def read_config(ckpt: Path, resume: bool = False) -> DRTConfig:
    """The DRTConfig of ``ckpt/config.json`` (``resume``: of a run being resumed, for the errors' advice)."""
    d = _read_json(ckpt / CONFIG, ckpt, resume)
    if isinstance(d, dict) and (d.get("model_type") == "drt" or "retrieval_top_k" in d):
        # not corrupt: the other format (it was called corrupt, to be deleted)
        raise CheckpointError(
            f"{ckpt} holds a transformers checkpoint (gca.hf's save_pretrained), not a gca one: load it with "
            f"gca.hf.DRTForCausalLM.from_pretrained({str(ckpt)!r}), whose .to_drt() is the gca.DRT, or convert it "
            f"once with gca.train.save_model(gca.hf.DRTForCausalLM.from_pretrained({str(ckpt)!r}).to_drt(), NEW_DIR)"
        )
    try:
        return DRTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise _corrupt(ckpt / CONFIG, f"does not hold a valid DRTConfig ({e})", ckpt, resume) from None


def read_checkpoint(ckpt: str | os.PathLike, with_trainer: bool = True) -> Checkpoint:
    """Verify and read a checkpoint directory (everything but the weights); ``with_trainer`` (resuming the
    run) also its trainer state."""
    ckpt = Path(ckpt)
    resume = with_trainer
    manifest = verify_checkpoint(ckpt, with_trainer)
    config = read_config(ckpt, resume)
    train_config = _read_json(ckpt / TRAIN_CONFIG, ckpt, resume)
    if not isinstance(train_config, dict):  # (valid JSON, but no TrainConfig: a resume failed with a TypeError)
        raise _corrupt(ckpt / TRAIN_CONFIG, f"does not hold a TrainConfig (a JSON {type(train_config).__name__}, not an object)", ckpt, resume)
    trainer = None
    if with_trainer:
        try:
            trainer = torch.load(ckpt / TRAINER, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, unpickling error, ...
            # (torch's paragraph on bad bytes advises weights_only=False: no help, and unsafe)
            unsafe = isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e)
            why = "its bytes are not a trainer state that torch.load reads safely" if unsafe else _first_line(e)
            raise _corrupt(ckpt / TRAINER, f"cannot be read ({why})", ckpt, resume) from None
        if not isinstance(trainer, dict) or trainer.get("step") != manifest["step"]:
            raise _corrupt(ckpt / TRAINER, "does not match the manifest's step", ckpt, resume)
    return Checkpoint(path=ckpt, step=manifest["step"], config=config, train_config=train_config, trainer=trainer)


def load_weights(
    model: DRT, ckpt: str | os.PathLike, device: str | torch.device = "cpu", saved_config: DRTConfig | None = None,
    resume: bool = False,
) -> tuple[list[str], list[str]]:
    """Load ``ckpt/model.safetensors`` into ``model`` (strict: every parameter must be there).

    With ``saved_config`` (the checkpoint's own config, when ``model`` was built from it with
    overrides, as fine-tuning does) the parameters that only the overridden model has keep their fresh
    initialisation and those it no longer has are dropped; returns those two lists of names. Any
    other mismatch is an error. ``resume``: the weights of a run being resumed (the errors' advice)."""
    ckpt = Path(ckpt)
    path = ckpt / WEIGHTS
    if not path.is_file():
        raise _corrupt(path, "is missing", ckpt, resume)
    dev = torch.device(device)  # (not the file's fault when the device cannot be used)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine; load on the CPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; load on the CPU")
    device = "cpu" if dev.type == "cpu" else str(dev)  # safetensors takes "cpu", not "cpu:0"
    regroup = (
        saved_config is not None
        and list(saved_config.upper_groups) != list(model.config.upper_groups)
        and sum(saved_config.upper_groups) == sum(model.config.upper_groups)
    )
    try:
        if regroup:  # the same upper layers in other retrieval groups: each layer keeps its weights by position
            missing, unexpected = _load_regrouped(model, path, saved_config.upper_groups, device)
        else:
            _check_shapes(model, path, ckpt, resume)
            missing, unexpected = _st_load_model(model, str(path), strict=False, device=str(device))
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, f"cannot be read ({_first_line(e)})", ckpt, resume) from None
    # (safetensors already leaves out the duplicate names of tied tensors from ``missing``)
    new, gone = [], []
    if saved_config is not None and (missing or unexpected):
        with torch.device("meta"):
            saved = set(DRT(saved_config).state_dict())
        now = set(model.state_dict())
        new = sorted(k for k in missing if k in now - saved)
        gone = sorted(k for k in unexpected if k in saved - now)
        missing = [k for k in missing if k not in new]
        unexpected = [k for k in unexpected if k not in gone]
    if missing or unexpected:
        raise _corrupt(path, f"does not fit the model of config.json (missing {_few(missing)}; unexpected {_few(unexpected)})",
                       ckpt, resume)
    return new, gone


def _few(names: list[str], n: int = 3) -> str:
    """``a, b, c and 12 more`` (``none`` for an empty list): error messages name a few, not hundreds."""
    if not names:
        return "none"
    names = sorted(names)  # (safetensors gives sets)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def shape_mismatches(model: DRT, path: str | os.PathLike) -> list[tuple[str, tuple, tuple]]:
    """``(name, shape in the file, shape in the model)`` of every tensor the weights file ``path`` and
    ``model`` share by name but not by shape. A file safetensors cannot read (truncated, not safetensors)
    raises the one-line :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        return _shape_mismatches(model, path)
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, f"cannot be read ({_first_line(e)})", path.parent) from None


def _shape_mismatches(model: DRT, path: Path) -> list[tuple[str, tuple, tuple]]:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k in want}
    return [(k, shape, want[k]) for k, shape in got.items() if shape != want[k]]


def _check_shapes(model: DRT, path: Path, ckpt: Path, resume: bool = False) -> None:
    """Raise a one-line :class:`CheckpointError` when tensors of the file and the model share a name but
    not a shape (a config.json that does not belong to the weights), instead of torch's line per tensor.
    (A file that cannot be read raises safetensors' error, which :func:`load_weights` names.)"""
    bad = _shape_mismatches(model, path)
    if bad:
        k, got, exp = bad[0]
        raise _corrupt(path, f"does not fit the model of config.json: {len(bad)} tensor(s) differ in shape, e.g. {k} "
                             f"is {got} in the file and {exp} in the model (was config.json edited or copied from "
                             f"another run?)", ckpt, resume)
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    with safe_open(str(path), framework="pt") as f:  # dtypes from the header (e.g. "I64"), no data read
        ints = [k for k in f.keys() if k in floating and not f.get_slice(k).get_dtype().startswith(("F", "BF"))]
    if ints:  # weights cast to an integer dtype are zeros: a model that loads and predicts nothing
        raise _corrupt(path, f"holds {len(ints)} weight(s) of a non-floating dtype, e.g. {ints[0]}: the model's "
                             f"weights were cast to integers when saved", ckpt, resume)


def _regroup_name(name: str, old_groups: list[int], new_groups: list[int]) -> str:
    """``groups.G.I.rest`` of a model with ``old_groups`` as the name of the same upper layer (counted
    from the first) in a model with ``new_groups``; other names unchanged."""
    m = re.match(r"groups\.(\d+)\.(\d+)\.(.*)", name)
    if m is None:
        return name
    flat = sum(old_groups[: int(m[1])]) + int(m[2])
    g = 0
    while flat >= new_groups[g]:
        flat -= new_groups[g]
        g += 1
    return f"groups.{g}.{flat}.{m[3]}"


def _load_regrouped(model: DRT, path: Path, old_groups: list[int], device) -> tuple[list[str], list[str]]:
    """Load weights saved from a model whose upper layers were grouped as ``old_groups`` (same total):
    upper layer i keeps its weights; a group's retrieval norm that the old model lacked stays fresh."""
    new_groups = list(model.config.upper_groups)
    state = {_regroup_name(k, list(old_groups), new_groups): v for k, v in _st_load_file(str(path), device=str(device)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    now = model.state_dict()
    loaded = {t.data_ptr() for k, t in now.items() if k in state}
    missing = [k for k in missing if now[k].data_ptr() not in loaded]  # tied names share a loaded tensor
    return missing, list(unexpected)


def verify_model_files(ckpt: Path) -> None:
    """What a model load checks before reading: the sizes and sha256 of the files of a training checkpoint
    (its manifest; the trainer state left out) or of a saved model folder (its ``manifest.json``). A
    folder with neither (saved before the manifest existed, or assembled by hand) is read as it is."""
    if (ckpt / MANIFEST).exists():
        verify_checkpoint(ckpt, with_trainer=False)
    elif (ckpt / MODEL_MANIFEST).exists():
        _verify_model_manifest(ckpt)


def load_model(dir_or_ckpt: str | os.PathLike, device: str | torch.device = "cpu") -> DRT:
    """Rebuild the model of a run directory (or checkpoint directory) with its trained weights, in eval mode.

    Args:
        dir_or_ckpt: ``DIR`` of ``gca train --out DIR``, or ``DIR/ckpt`` (any folder holding
            ``config.json`` and ``model.safetensors``).
        device: where to put the model.
    Raises:
        CheckpointError: no checkpoint there, or it is incomplete or corrupt (the message says which file).
    """
    path = Path(dir_or_ckpt)
    ckpt = find_checkpoint(path, repair=False)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {path}: expected {path / CKPT}/ or {path}/{WEIGHTS} with {CONFIG}")
    verify_model_files(ckpt)
    model = DRT(read_config(ckpt))
    load_weights(model, ckpt, device)
    return model.to(device).eval()


def export_model(dir_or_ckpt: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a compact, weights-only copy of a checkpoint (for sharing or shipping): ``model.safetensors``
    in ``dtype``, ``config.json``, and ``train_config.json`` / ``tokenizer.json`` when present.
    :func:`load_model` reads it back (weights are cast to the model's float32 parameters)."""
    src = find_checkpoint(Path(dir_or_ckpt), repair=False)
    if src is None:
        raise CheckpointError(f"no checkpoint in {dir_or_ckpt}")
    if Path(out).resolve() in (src.resolve(), Path(dir_or_ckpt).resolve()):
        raise ValueError(f"export_model: write the copy to another folder than {dir_or_ckpt}")
    out = save_model(load_model(src), out, dtype=dtype)
    copied = [name for name in (TRAIN_CONFIG, "tokenizer.json") if (src / name).exists()]
    if copied:
        (out / MODEL_MANIFEST).unlink(missing_ok=True)  # (until the copies are listed in it)
        for name in copied:
            shutil.copyfile(src / name, out / name)
        _write_model_manifest(out, [WEIGHTS, CONFIG, *copied])
    return out


def save_model(model: DRT, out: str | os.PathLike, dtype: torch.dtype | None = None, tokenizer: Any = None) -> Path:
    """Save any :class:`gca.DRT` (trained by ``gca train`` or not) as a folder :func:`load_model` reads:
    ``model.safetensors`` (in ``dtype``, default the model's), ``config.json``, given a tokenizer,
    ``tokenizer.json``, and last ``manifest.json`` (their sizes and sha256, which every load checks). The
    model itself is left as it is; a ``torch.compile`` or DDP wrapper is looked through (its names would
    carry the wrapper's prefix, which no DRT loads)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    model = getattr(model, "module", model)  # DistributedDataParallel's
    if not isinstance(model, DRT):
        raise ValueError(f"save_model saves a gca.DRT, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...) or None "
                         f"for the model's own, got {dtype!r}")
    if tokenizer is not None:
        if not callable(getattr(tokenizer, "save", None)):
            raise TypeError(f"tokenizer must be a gca.data.Tokenizer (or a tokenizers.Tokenizer), got "
                            f"{type(tokenizer).__name__}; to copy a tokenizer.json file, load it first with "
                            f"gca.data.load_tokenizer(PATH)")
        n = getattr(tokenizer, "vocab_size", None)
        if n is None and callable(getattr(tokenizer, "get_vocab_size", None)):
            n = tokenizer.get_vocab_size(with_added_tokens=True)
        if isinstance(n, int) and n > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {n} ids but the model's vocabulary is {model.config.vocab_size}: "
                             f"the ids from {model.config.vocab_size} on would be out of its range")
    out = Path(out)
    if (out / CKPT).is_dir() or (out / MANIFEST).exists():
        raise ValueError(f"{out} holds a training run's checkpoint: save the model to a folder of its own "
                         f"(load_model would read this file instead of the run's)")
    out.mkdir(parents=True, exist_ok=True)
    # a previous save's manifest goes first: a save cut short leaves a folder read unchecked, not one refused
    (out / MODEL_MANIFEST).unlink(missing_ok=True)
    state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    _st_save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)  # a crash leaves the previous file or none, never half of one
    _write_json(out / CONFIG, model.config.to_dict())
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    elif (out / "tokenizer.json").exists():  # a model saved there before left its tokenizer: it is not this one's
        (out / "tokenizer.json").unlink()
        warnings.warn(f"save_model: removed {out / 'tokenizer.json'}, left by the model saved there before; pass "
                      f"tokenizer= to save this model's", stacklevel=2)
    _write_model_manifest(out, [WEIGHTS, CONFIG] + (["tokenizer.json"] if tokenizer is not None else []))
    return out
