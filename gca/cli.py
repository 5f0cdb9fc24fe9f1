"""The ``gca`` command: ``prepare``, ``train``, ``eval``, ``generate``, ``bench``, ``replay-nonfinite``, ``demo``.

    gca prepare debian-docs --out data/docs --train-tokenizer --vocab-size 8192
    gca train --preset tiny --data synthetic:passkey --max-steps 300 --out runs/tiny
    torchrun --standalone --nproc-per-node 8 -m gca.cli train --preset paper --data data/pg19 --out runs/paper
    python -m gca.cli --help

Each subcommand imports the heavy parts it needs (data, trainer) only when it runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import textwrap
import warnings
from typing import Any

_FMT = argparse.RawDescriptionHelpFormatter


def int_at_least(lo: int):
    """An argparse ``type``: an integer >= ``lo``, so a bad count ends in argparse's one-line
    "argument --trials: must be >= 1, got 0" rather than deep inside a run."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def device_arg(text: str) -> str:
    """An argparse ``type`` for ``--device``: ``auto`` or a device torch knows that this machine has, so
    ``--device cuda`` without a GPU ends in one line naming the fix (not in a failed checkpoint read
    or a traceback deep inside the run)."""
    if text == "auto":
        return text
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine; use --device cpu (or auto)")
    return text


def _doc(s: str) -> str:
    return textwrap.dedent(s).strip("\n")


# ---- train ----
TRAIN_EXAMPLES = _doc(
    """
    examples:
      # CPU, a tiny model on the synthetic passkey task (about 5 minutes on 2 cores)
      gca train --preset tiny --data synthetic:passkey --seq-len 504 --batch-size 8 --max-steps 300 --out runs/tiny

      # one GPU (bf16 autocast is on by default on CUDA), a prepared dataset
      gca train --preset small --data data/pg19 --seq-len 4032 --batch-size 8 --max-steps 20000 --out runs/small

      # 8 GPUs of one host; --batch-size is per process
      torchrun --standalone --nproc-per-node 8 -m gca.cli train --preset paper --data data/pg19 \\
          --seq-len 16380 --batch-size 4 --max-steps 100000 --out runs/paper

      # a narrower model with two retrieval groups; the sliding-window baseline of the same size
      gca train --preset tiny --set hidden_size=64 --set upper_groups=[2,2] --data synthetic:mix --out runs/g2
      gca train --preset tiny --arch swa --data synthetic:mix --out runs/swa

      # fine-tune a trained run on the needle tasks over its corpus, softmax-off-by-one off
      gca train --init-from runs/small --data "synthetic:mix;filler=data/pg19" --seq-len 4032 \\
          --set gca_softmax_one=false --lr 5e-4 --max-steps 2000 --out runs/small-needles

    Rerunning the same command with the same --out resumes from DIR/ckpt (exactly: the losses match an
    uninterrupted run on CPU). Only --max-steps, --stop-at, --time-limit, --max-nonfinite, --save-every,
    --log-every, --eval-every, --eval-batches, --device, --compile and --grad-checkpointing may change
    on resume.
    Writes DIR/log.jsonl (one JSON row per logged step), DIR/tb (TensorBoard, if installed) and DIR/ckpt.
    """
)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["hidden_size=128", "upper_groups=[2,2]", "arch=swa"]`` -> ``{"hidden_size": 128, ...}``.
    Values are read as JSON (or Python literals: True, None), else kept as strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set hidden_size=128")
        raw = raw.strip()
        try:
            val = json.loads(raw)
        except ValueError:
            try:
                val = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                val = raw
        out[key] = val
    return out


def _add_train(sub) -> None:
    from gca.train.trainer import TrainConfig  # light: no torch work at import

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a DRT (or a baseline); resumes when DIR already has a checkpoint",
        description="Train a DRT model or a baseline with AdamW, warm-up + cosine decay, checkpoints and DDP.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=_FMT,
    )
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help=f"DRTConfig preset: tiny, small, paper (default {d.preset}; ignored with --init-from, "
                                                  "which brings its own model)")
    g.add_argument("--init-from", default=None, metavar="DIR",
                   help="fine-tune: start from the weights and model config of this run or checkpoint folder "
                        "(--set still overrides fields, e.g. --set gca_softmax_one=false; --set upper_groups regroups the same upper "
                        "layers, each keeping its weights); the optimizer starts fresh")
    g.add_argument("--freeze", default=None, metavar="REGEX",
                   help="do not train the parameters whose names match this regular expression, e.g. "
                        "'^(embed|lower|encoder|retr_norms)\\.' keeps retrieval as it is while fine-tuning the rest "
                        "(the tied output head is the embedding: add --set tie_embeddings=false to train a head "
                        "that starts as its copy)")
    g.add_argument("--lr-scale", dest="lr_scale", action="append", default=[], metavar="REGEX=FACTOR",
                   help="train the parameters whose names match REGEX at FACTOR x the learning rate, repeatable "
                        "(the first matching pattern wins), e.g. --lr-scale '^(embed|lower|encoder|retr_norms)\\.=0.05' "
                        "lets retrieval adapt slowly while the rest learns")
    g.add_argument("--arch", choices=["drt", "swa", "full"], default=None, help="drt, or a baseline of the same size: swa (sliding window only), full (full attention); default: the preset's (drt)")
    g.add_argument("--set", dest="set", action="append", metavar="KEY=VALUE", default=[], help="override a DRTConfig field, repeatable: --set hidden_size=128 --set upper_groups=[2,2] --set residual=published")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="SPEC", help="data source: synthetic:passkey, synthetic:mix, a directory made by `gca prepare`, or a mixture")
    g.add_argument("--seq-len", type=int_at_least(2), default=d.seq_len, help=f"tokens per training sequence (default {d.seq_len} = 16 chunks of 63)")
    g.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size, help=f"sequences per micro-batch per process (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int_at_least(1), default=d.grad_accum, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int_at_least(1), default=d.max_steps, help=f"optimizer steps (default {d.max_steps}); raised on a finished or stopped run, it continues with the "
                        "cosine recomputed for the new end, so the learning rate goes back up to that schedule's value")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr}, the paper's)")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate of the cosine (default 0.2 * lr, the paper's 4e-4 for 2e-3)")
    g.add_argument("--warmup", type=float, default=d.warmup, help=f"warm-up as a fraction of --max-steps (default {d.warmup})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay on linear weights (default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"global gradient-norm clip, 0 = off (default {d.grad_clip})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of the initialisation and the data (default {d.seed})")
    g.add_argument("--max-nonfinite", type=int_at_least(0), default=d.max_nonfinite,
                   help=f"skip updates whose gradient is NaN/inf (the batch is saved in DIR/nonfinite) and stop after "
                        f"this many in a row (default {d.max_nonfinite}; 0 = stop at the first)")
    g = p.add_argument_group("run directory and logging")
    g.add_argument("--out", required=True, metavar="DIR", help="run directory: log.jsonl, tb/, ckpt/ (resumed if it has a checkpoint)")
    g.add_argument("--save-every", type=int_at_least(1), default=d.save_every, help=f"checkpoint every N steps and at the end (default {d.save_every})")
    g.add_argument("--log-every", type=int_at_least(1), default=d.log_every, help=f"log.jsonl row every N steps (default {d.log_every})")
    g.add_argument("--eval-every", type=int_at_least(0), default=d.eval_every, help=f"validation every N steps and at the end, 0 = never (default {d.eval_every})")
    g.add_argument("--stop-at", type=int_at_least(0), default=0, metavar="STEP",
                   help="stop with a checkpoint after this step without changing the schedule (rerun without it to go on)")
    g.add_argument("--time-limit", type=float, default=0.0, help="stop with a checkpoint after this many minutes (0 = no limit); rerun to resume")
    g.add_argument("--eval-batches", type=int_at_least(0), default=d.eval_batches, help=f"validation batches per process (default {d.eval_batches})")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g = p.add_argument_group("execution")
    g.add_argument("--device", type=device_arg, default=d.device, help="auto (cuda if available), cpu, cuda, cuda:N (default auto; torchrun uses cuda:LOCAL_RANK)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d.bf16, help="bf16 autocast on CUDA (default on; CPU always trains in fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.set_defaults(func=cmd_train)


def parse_lr_scale(items: list[str]) -> dict[str, float]:
    """``--lr-scale REGEX=FACTOR`` items -> {regex: factor} (split at the last ``=``)."""
    out = {}
    for item in items:
        pattern, sep, factor = item.rpartition("=")
        try:
            out[pattern] = float(factor)
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise ValueError(f"--lr-scale {item!r}: expected REGEX=FACTOR, e.g. '^encoder\\.=0.1'")
    return out


def train_config_from_args(args: argparse.Namespace):
    import dataclasses

    from gca.config import DRTConfig
    from gca.train.trainer import TrainConfig

    if args.preset is not None and args.init_from is not None:  # (kept in train_config.json: runs resume as before)
        warnings.warn(f"--preset {args.preset} is ignored: with --init-from the model is {args.init_from}'s "
                      f"(with any --set and --arch changes)", stacklevel=2)
    model = parse_set(args.set)
    training = {f.name for f in dataclasses.fields(TrainConfig)} - {f.name for f in dataclasses.fields(DRTConfig)}
    for key in model:  # --set lr=0.1 was refused as an unknown model field, without a word about --lr
        if key in training - {"model"}:
            how = {"progress": "--no-progress"}.get(key, f"--{key.replace('_', '-')}")
            how = f"TrainConfig({key}=...) from Python" if key in ("betas", "eps", "tensorboard") else how
            raise ValueError(f"--set {key}=...: {key} is a training setting, not a model field; give it as {how} "
                             f"(gca train --help)")
    return TrainConfig(
        preset=args.preset if args.preset is not None else TrainConfig.preset,
        init_from=args.init_from,
        freeze=args.freeze,
        lr_scale=parse_lr_scale(args.lr_scale),
        model=model,
        arch=args.arch,
        data=args.data,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr=0.2 * args.lr if args.min_lr is None else args.min_lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        max_steps=args.max_steps,
        save_every=args.save_every,
        log_every=args.log_every,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        time_limit=args.time_limit,
        max_nonfinite=args.max_nonfinite,
        stop_at=args.stop_at,
        seed=args.seed,
        out=args.out,
        device=args.device,
        bf16=args.bf16,
        grad_checkpointing=args.grad_checkpointing,
        compile=args.compile,
        progress=not args.no_progress,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from gca.train.trainer import train

    cfg = train_config_from_args(args)
    cfg.model_config()  # unknown --set keys and bad values fail here, before any data is built (main(): one line, status 2)
    result = train(cfg)
    # stopped by Ctrl-C / SIGTERM after saving a checkpoint: the shell's status for that signal
    return 128 + result.interrupted if result.interrupted else 0


# ---- prepare ----
PREPARE_EXAMPLES = _doc(
    """
    examples:
      # the Debian documentation installed on this machine (/usr/share/doc): an offline corpus,
      # with the package's embedded 2048-token byte-level BPE
      gca prepare debian-docs --out data/docs --val-fraction 0.02

      # local text files or folders (txt, md, html, jsonl, parquet), the GPT-2 tokenizer
      gca prepare books/ notes.jsonl --out data/books --tokenizer gpt2

      # a Hugging Face dataset, and a new byte-level BPE of 8192 tokens trained on it
      gca prepare hf:emozilla/pg19 --out data/pg19 --train-tokenizer --vocab-size 8192

    Then train on it: gca train --data data/docs --out runs/docs
    """
)


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus into a dataset directory for `gca train --data DIR`",
        description="Tokenize text into a dataset directory: train.bin/val.bin token streams, tokenizer.json, meta.json.",
        epilog=PREPARE_EXAMPLES,
        formatter_class=_FMT,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files or folders, hf:NAME (a Hugging Face dataset), or debian-docs")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default="embedded", metavar="PATH_OR_NAME", help="embedded (the package's 2048-token BPE, default), a tokenizer.json, a folder holding one, or a Hugging Face name such as gpt2")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE tokenizer on the inputs first")
    p.add_argument("--vocab-size", type=int_at_least(2), default=None, help="vocabulary of --train-tokenizer (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="expected share of documents held out for validation (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL, parquet and HF datasets (default text)")
    p.add_argument("--max-documents", type=int_at_least(1), default=None, help="stop after this many documents (quick experiments)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset in --out")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from gca.data.prepare import prepare
    from gca.data.tokenizer import train_bpe

    try:
        tokenizer = args.tokenizer
        if args.vocab_size is not None and not args.train_tokenizer:
            raise ValueError("--vocab-size sets the size of a tokenizer trained with --train-tokenizer; add "
                             "--train-tokenizer, or drop --vocab-size (--tokenizer's vocabulary is fixed)")
        if args.train_tokenizer:
            # the documents prepare() reads: the same --text-field, and no more than --max-documents
            tokenizer = train_bpe(args.inputs, args.vocab_size or 8192, text_field=args.text_field,
                                  max_documents=args.max_documents)
        meta = prepare(
            args.inputs,
            args.out,
            tokenizer=tokenizer,
            val_fraction=args.val_fraction,
            seed=args.seed,
            text_field=args.text_field,
            max_documents=args.max_documents,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"gca prepare: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=2, default=str))
    return 0


# ---- replay-nonfinite ----
def _add_replay_nonfinite(sub) -> None:
    p = sub.add_parser(
        "replay-nonfinite",
        help="run a training step whose gradient was NaN/inf again and say where it came from",
        description=_doc(
            """
            Run the first (or --step) saved non-finite step of a training run again: its batch through the
            weights that gave it (DIR/nonfinite/, kept by `gca train`), forward and backward as training does,
            under PyTorch's anomaly detection. Prints the parameters whose gradients are not finite, the first
            backward function that returned a non-finite value, and the model code that made it.
            """
        ),
        epilog=_doc(
            """
            examples:
              gca replay-nonfinite runs/small
              gca replay-nonfinite runs/small --step 893 --device cpu
              gca replay-nonfinite runs/small --set gca_impl=torch   # does it follow the GCA backend?
            """
        ),
        formatter_class=_FMT,
    )
    p.add_argument("run", metavar="DIR", help="the run folder of `gca train --out DIR`")
    p.add_argument("--step", type=int, default=None, help="which saved step (default: the first, whose weights were kept)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA (as `gca train --no-bf16`)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training-time noise (default 0)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="change a model config field first, e.g. --set gca_impl=torch (repeatable)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    p.set_defaults(func=cmd_replay_nonfinite)


def cmd_replay_nonfinite(args: argparse.Namespace) -> int:
    """Exit status 0 when the non-finite gradient came back, 1 when it did not, 2 on bad input."""
    from gca.train.nonfinite import format_report, replay_nonfinite

    # bad input (no saved step, a corrupt checkpoint, an unknown --set key) ends in main()'s one-line error, status 2
    r = replay_nonfinite(args.run, step=args.step, device=args.device, bf16=not args.no_bf16, seed=args.seed,
                         overrides=parse_set(args.set))
    print(format_report(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=1)
    return 0 if r["reproduced"] else 1


# ---- demo ----
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a tiny DRT on CPU and show it retrieving a passkey far beyond its training length",
        description="The end-to-end demo: train a tiny model, then test passkey retrieval at growing lengths.",
        epilog="example:\n  gca demo --out runs/demo",
        formatter_class=_FMT,
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory (default runs/demo)")
    p.add_argument("--minutes", type=positive_float, default=2.5, help="training time of the from-scratch model (default 2.5)")
    p.add_argument("--trials", type=int_at_least(1), default=6, help="passkey trials per length and depth (default 6)")
    p.add_argument("--no-train", action="store_true", help="only evaluate the shipped checkpoint")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """``gca demo``: see :mod:`gca.demo`."""
    from gca.demo import run_demo as demo

    return demo(out=args.out, minutes=args.minutes, device=args.device, trials=args.trials, train=not args.no_train)


# ---- entry point ----
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gca",
        description="Grouped Cross Attention and the DRT model: prepare data, train, evaluate, generate, benchmark.",
        epilog=_doc(
            """
            examples:
              gca demo
              gca train --preset tiny --data synthetic:passkey --max-steps 300 --out runs/tiny
              torchrun --standalone --nproc-per-node 8 -m gca.cli train --preset paper --data data/pg19 --out runs/paper
            Run `gca COMMAND --help` for each command's options.
            """
        ),
        formatter_class=_FMT,
    )
    from gca import __version__

    p.add_argument("--version", action="version", version=f"gca {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_prepare(sub)
    _add_train(sub)
    from gca.eval.cli import add_bench, add_eval, add_generate, add_plot

    add_eval(sub)
    add_plot(sub)
    add_generate(sub)
    add_bench(sub)
    _add_replay_nonfinite(sub)
    _add_demo(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. A missing or corrupt checkpoint or dataset, a bad value, a file the system refuses
    and a missing optional package (what the library raises as CheckpointError, OSError, ValueError or ImportError,
    each message naming what to fix) end the command with one line, ``gca COMMAND: error: MESSAGE``,
    and exit status 2, as does a training run stopped by a non-finite loss or gradient (FloatingPointError,
    its message saying what to try); ``GCA_TRACEBACK=1`` in the environment shows the traceback instead."""
    from gca.train.checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    shown = warnings.showwarning
    warnings.showwarning = lambda message, *a, **k: print(f"gca {args.command}: warning: {message}", file=sys.stderr)
    try:
        return int(args.func(args) or 0)
    # (OSError: a missing file, a file where a folder is due or the reverse, no permission, a full disk)
    except (CheckpointError, OSError, ValueError, ImportError, FloatingPointError) as e:
        if os.environ.get("GCA_TRACEBACK", "") not in ("", "0"):
            raise
        _close_progress_bars()
        print(f"gca {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (gca train saves a checkpoint first; a second Ctrl-C ends here)
        if os.environ.get("GCA_TRACEBACK", "") not in ("", "0"):
            raise
        _close_progress_bars()
        print(f"gca {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def run_script(main, name: str) -> None:
    """Run a script's ``main()`` (``scripts/*.py``) as ``gca`` runs a command: a missing or corrupt
    checkpoint, a missing file or bad input (CheckpointError, OSError, ValueError) ends it with one line,
    ``NAME: error: MESSAGE``, and exit status 1; ``GCA_TRACEBACK=1`` shows the traceback instead."""
    from gca.train.checkpoint import CheckpointError

    try:
        main()
    except (CheckpointError, OSError, ValueError) as e:
        if os.environ.get("GCA_TRACEBACK", "") not in ("", "0"):
            raise
        sys.exit(f"{name}: error: {e}")


def _close_progress_bars() -> None:
    """End any progress bar still open, so that the error line starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
