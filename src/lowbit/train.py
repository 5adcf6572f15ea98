"""Train the float reference models, evaluate them, and cache them as checkpoints.

Training is AdamW (plain Adam when ``weight_decay`` is 0) with a per-step cosine learning-rate decay
and cross-entropy loss; everything is seeded (the torch RNG and the DataLoader's shuffling
generator), so the same seed on the same machine gives the same weights.

Checkpoints are ``torch.save`` files holding ``{"format", "format_version", "state_dict", "meta"}``;
``meta`` is JSON-serializable (model, dataset, in_channels, num_classes, input_size, accuracy,
epochs, seed, lr, batch_size, lowbit_version, ...), so :func:`load_checkpoint` can read them with
``torch.load(weights_only=True)`` and rebuild the model through :func:`lowbit.models.build`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from . import files, models
from .data import KNOWN_DATASETS, DatasetSplits, load_dataset, make_loader

__all__ = [
    "train",
    "accuracy",
    "save_checkpoint",
    "load_checkpoint",
    "default_checkpoint_path",
    "default_hparams",
    "train_or_load",
    "add_train_arguments",
    "cli_train",
]

CHECKPOINT_FORMAT = "lowbit-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# Default epochs per dataset and model. digits/small_cnn: ~10-15 s on one thread (99.3-99.6% test);
# mnist/small_cnn: ~1.5 min per epoch on one thread (99.2% after one).
_DEFAULT_EPOCHS: dict[str, dict[str, int]] = {
    "digits": {"small_cnn": 20, "resnet20": 30, "mobilenet": 30},
    "mnist": {"small_cnn": 2, "tiny_cnn": 2, "tiny_cnn16": 2, "resnet20": 2, "mobilenet": 2},
    "fashion_mnist": {"small_cnn": 5, "resnet20": 5, "mobilenet": 5},
    "cifar10": {"small_cnn": 15, "resnet20": 30, "mobilenet": 30},
    "cifar100": {"small_cnn": 20, "resnet20": 40, "mobilenet": 40},
}
_DEFAULT_LR = 1e-3
_DEFAULT_BATCH = {"digits": 32}
# Intra-op threads for training. The 8x8 digits nets gain next to nothing from a second thread but
# slow down ~10x when OpenMP threads are oversubscribed (a busy 2-core machine), and one thread
# also makes the digits weights independent of the machine's core count. None: torch's default.
_DEFAULT_THREADS: dict[str, int | None] = {"digits": 1}


def default_hparams(model_name: str, dataset: str) -> dict[str, Any]:
    """Default ``epochs``, ``lr``, ``batch_size`` and ``threads`` for ``model_name`` on ``dataset``."""
    per_model = _DEFAULT_EPOCHS.get(dataset, {})
    return {
        "epochs": per_model.get(model_name, 10),
        "lr": _DEFAULT_LR,
        "batch_size": _DEFAULT_BATCH.get(dataset, 64),
        "threads": _DEFAULT_THREADS.get(dataset),
    }


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` in percent (eval mode, no grad; mode restored)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        if isinstance(dataset, TensorDataset):
            x_all, y_all = dataset.tensors[0], dataset.tensors[1]
            batches = ((x_all[i : i + batch_size], y_all[i : i + batch_size]) for i in range(0, len(y_all), batch_size))
        else:
            batches = iter(make_loader(dataset, batch_size, shuffle=False))
        for x, y in batches:
            pred = model(x).argmax(dim=1)
            correct += int((pred == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    return 100.0 * correct / total if total else math.nan


# -------------------------------------------------------------------------------------- training


def train(
    model: nn.Module,
    splits: DatasetSplits,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on ``splits.train``; evaluate on ``splits.test`` after every epoch.

    ``threads``: torch intra-op threads to train with (restored afterwards); None keeps the current
    setting. Results are bit-reproducible for a given seed *and* thread count.

    Returns the history: ``loss`` (mean training loss per epoch), ``test_acc`` (percent, per
    epoch), ``final_test_acc``, ``time_s``, and the hyperparameters used.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(model, splits, epochs, lr, batch_size, seed, weight_decay, progress)
    finally:
        torch.set_num_threads(prev_threads)


def _train(
    model: nn.Module,
    splits: DatasetSplits,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float,
    progress: bool,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    loader = make_loader(splits.train, batch_size, shuffle=True, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    loss_fn = nn.CrossEntropyLoss()
    history: dict[str, Any] = {
        "loss": [],
        "test_acc": [],
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "weight_decay": weight_decay,
        "threads": torch.get_num_threads(),
    }
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{epochs}",
            disable=not progress,
            leave=False,
            file=sys.stderr,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,  # keep logs short when not a terminal
        )
        for x, y in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
        bar.close()
        acc = accuracy(model, splits.test)
        history["loss"].append(running / max(seen, 1))
        history["test_acc"].append(acc)
        if progress:
            tqdm.write(
                f"epoch {epoch}/{epochs}: loss {running / max(seen, 1):.4f}, test acc {acc:.2f}%",
                file=sys.stderr,
            )
    model.eval()
    history["final_test_acc"] = history["test_acc"][-1] if epochs else accuracy(model, splits.test)
    history["time_s"] = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------------- checkpoints


def default_checkpoint_path(model_name: str, dataset: str, root: str | os.PathLike[str] = "runs") -> Path:
    return Path(root) / f"{model_name}-{dataset}.pt"


def _full_meta(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    from . import __version__

    full = {**getattr(model, "lowbit_arch", {}), **meta}
    full.setdefault("lowbit_version", __version__)
    return full


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any]) -> Path:
    """Atomically write ``model``'s state_dict and ``meta`` to ``path`` (:mod:`lowbit.files`).

    ``meta`` must be JSON-serializable; the architecture recorded by :func:`models.build`
    (``model.lowbit_arch``) fills in missing model/in_channels/num_classes/input_size keys, and
    ``lowbit_version`` is added.
    """
    path = Path(path)
    full = _full_meta(model, meta)
    try:
        json.dumps(full)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta must be JSON-serializable: {e}") from e
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": state,
        "meta": full,
    }
    return files.write_stream(path, lambda f: torch.save(payload, f))


_REQUIRED_META = ("model", "in_channels", "num_classes", "input_size")


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path`` (eval mode) and return it with its meta dict.

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` naming the file if it is
    corrupt, truncated, or not a lowbit checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any deserialization failure means a bad file
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a lowbit checkpoint")
    meta, state = payload.get("meta"), payload.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise ValueError(f"{path}: lowbit checkpoint without meta/state_dict")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path}: checkpoint meta lacks {', '.join(missing)}")
    try:
        model = models.build(meta["model"], meta["in_channels"], meta["num_classes"], meta["input_size"])
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: checkpoint does not match model {meta['model']!r}: {e}") from e
    model.eval()
    return model, dict(meta)


# ------------------------------------------------------------------------------ train-or-load


def _train_and_save(
    model_name: str,
    splits: DatasetSplits,
    hp: dict[str, Any],
    seed: int,
    path: Path,
    progress: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(seed)
    model = models.build(model_name, splits.in_channels, splits.num_classes, splits.input_size)
    hist = train(
        model,
        splits,
        hp["epochs"],
        lr=hp["lr"],
        batch_size=hp["batch_size"],
        seed=seed,
        progress=progress,
        threads=hp.get("threads"),
    )
    meta = {
        "model": model_name,
        "dataset": splits.name,
        "in_channels": splits.in_channels,
        "num_classes": splits.num_classes,
        "input_size": splits.input_size,
        "accuracy": hist["final_test_acc"],
        "epochs": hp["epochs"],
        "seed": seed,
        "lr": hp["lr"],
        "batch_size": hp["batch_size"],
        "calib_size": len(splits.calib),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "train_time_s": hist["time_s"],
        "threads": hist["threads"],
        "history": {"loss": hist["loss"], "test_acc": hist["test_acc"]},
    }
    meta = _full_meta(model, meta)
    save_checkpoint(path, model, meta)
    model.eval()
    return model, meta


def _meta_matches(meta: dict[str, Any], want: dict[str, Any]) -> bool:
    return all(meta.get(k) == v for k, v in want.items())


def train_or_load(
    model_name: str,
    dataset_name: str,
    data_dir: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    *,
    lr: float | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    download: bool = False,
) -> tuple[nn.Module, DatasetSplits, dict[str, Any]]:
    """The trained float model for (model, dataset, seed) and its splits and meta.

    ``checkpoint`` given: the caller's file. If it exists it is used as is and never overwritten; it
    must be a checkpoint of this model for this dataset and seed (the seed fixes the test split), and
    of the ``epochs``/``lr``/``batch_size`` asked for explicitly, else ValueError naming the mismatch.
    If it does not exist, the model is trained and written there.

    ``checkpoint`` None: lowbit's cache ``runs/{model}-{dataset}.pt``, used when its meta matches the
    request (defaults included), else retrained and replaced (with a warning when it is unreadable).

    Returns ``(model in eval mode, splits, meta)``.
    """
    model_key = model_name.strip().lower().replace("-", "_")
    if model_key not in models.MODELS:
        models.build(model_name, 1, 1, 1)  # raises the ValueError listing the models
    splits = load_dataset(dataset_name, data_dir=data_dir, seed=seed, download=download)
    hp = default_hparams(model_key, splits.name)
    asked = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)) if v is not None}
    hp.update(asked)
    if threads is not None:
        hp["threads"] = threads
    fits = {
        "model": model_key,
        "dataset": splits.name,
        "in_channels": splits.in_channels,
        "num_classes": splits.num_classes,
        "input_size": splits.input_size,
        "seed": seed,
    }
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.exists():
            model, meta = load_checkpoint(path)
            _check_fits(path, meta, {**fits, **asked})
            return model, splits, meta
    else:
        path = default_checkpoint_path(model_key, splits.name)
        want = {**fits, **{k: hp[k] for k in ("epochs", "lr", "batch_size")}}  # threads: not matched
        if path.is_file():
            try:
                model, meta = load_checkpoint(path)
            except ValueError as e:
                warnings.warn(f"ignoring unusable cached checkpoint, retraining: {e}", stacklevel=2)
            else:
                if _meta_matches(meta, want):
                    return model, splits, meta
    model, meta = _train_and_save(model_key, splits, hp, seed, path, progress)
    return model, splits, meta


def _check_fits(path: Path, meta: dict[str, Any], want: dict[str, Any]) -> None:
    bad = [f"{k} {meta.get(k)!r} (asked {v!r})" for k, v in want.items() if k in meta and meta[k] != v]
    if bad:
        raise ValueError(f"{path}: the checkpoint does not fit this run: {', '.join(bad)}. A checkpoint you name is "
                         "used as is and never overwritten: pass matching options, or a new checkpoint path to "
                         "train one")


# ---------------------------------------------------------------------------------------- CLI


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``lowbit train``."""
    from .cliargs import non_negative_int, positive_float, positive_int

    p.add_argument("model", choices=models.available_models(), help="reference model to train")
    p.add_argument("--data", default="digits", help=f"dataset ({', '.join(KNOWN_DATASETS)}); default digits")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (else $LOWBIT_DATA, ...)")
    p.add_argument("--epochs", type=non_negative_int, default=None, help="training epochs (default: per dataset)")
    p.add_argument("--seed", type=int, default=0, help="seed for the data split, init and shuffling")
    p.add_argument("--out", default=None, help="checkpoint path (default runs/{model}-{dataset}.pt)")
    p.add_argument("--lr", type=positive_float, default=None, help=f"learning rate (default {_DEFAULT_LR})")
    p.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default: per dataset)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing (needs torchvision)")


def cli_train(args: argparse.Namespace) -> int:
    """``lowbit train``: always trains (ignores any cached checkpoint) and saves the checkpoint."""
    try:
        splits = load_dataset(
            args.data,
            data_dir=getattr(args, "data_dir", None),
            seed=args.seed,
            download=getattr(args, "download", False),
        )
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"lowbit train: {e}", file=sys.stderr)
        return 2
    model_key = args.model.strip().lower().replace("-", "_")
    if model_key not in models.MODELS:
        print(f"lowbit train: unknown model {args.model!r}; available: {', '.join(models.MODELS)}", file=sys.stderr)
        return 2
    hp = default_hparams(model_key, splits.name)
    for key in ("epochs", "lr", "batch_size"):
        if getattr(args, key, None) is not None:
            hp[key] = getattr(args, key)
    threads = getattr(args, "threads", None)  # honoured if the lead's parser has a --threads option
    if isinstance(threads, int) and threads > 0:
        hp["threads"] = threads
    out = getattr(args, "out", None)
    path = Path(out) if out else default_checkpoint_path(model_key, splits.name)
    print(f"{splits.summary()} (from {splits.source}); training {model_key} for {hp['epochs']} epochs", file=sys.stderr)
    _, meta = _train_and_save(model_key, splits, hp, args.seed, path, progress=getattr(args, "progress", True))
    print(f"test accuracy: {meta['accuracy']:.2f}% ({meta['train_time_s']:.1f} s)")
    print(f"checkpoint: {path}")
    return 0
