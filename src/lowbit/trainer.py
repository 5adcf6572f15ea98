"""lowbit's training loop for fine-tuning (quantization-aware training, gradual freezing, ...).

:func:`fit` trains any classifier on labelled data with cross-entropy:

* Adam or SGD (momentum 0.9), learning rate ``lr`` decayed per step by a cosine to 0 (or constant);
  ``epochs`` may be fractional;
* deterministic for a ``seed`` (and a thread count): the order of the samples in epoch ``e`` is a
  permutation drawn from ``seed`` and ``e``, so a run resumed from a checkpoint continues exactly as
  the uninterrupted run would have;
* evaluation on the test data every ``eval_every`` epochs (fractions allowed, so "epochs to reach an
  accuracy" can be measured below one epoch) and at the end; a progress bar on the terminal;
* atomic checkpoints (model, optimizer, step, history, random state) at every evaluation; ``resume``
  continues from one, after checking it belongs to the same model and configuration;
* device-agnostic (``device="cuda"`` where a GPU exists) and distributed: under ``torchrun`` (a
  ``torch.distributed`` process group initialized, e.g. by :func:`init_distributed`) the model is wrapped
  in DistributedDataParallel, every rank takes its share of each epoch's permutation, rank 0 evaluates
  and writes checkpoints, and the results are broadcast so every rank returns the same history;
* a loss that becomes NaN or Inf stops training with an error naming the step.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import files

__all__ = ["FitOptions", "FitResult", "fit", "init_distributed", "rank", "world_size", "load_fit_checkpoint"]

FIT_CHECKPOINT_FORMAT = "lowbit-fit-checkpoint"
FIT_CHECKPOINT_VERSION = 1


@dataclass
class FitOptions:
    """Options of :func:`fit` (see the module docstring)."""

    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    eval_every: float | None = None
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True
    checkpoint: str | os.PathLike[str] | None = None
    resume: bool = False
    max_steps: int | None = None  # stop after this many steps (the schedule still spans ``epochs``)
    eval_batch_size: int = 1000

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs) and self.epochs >= 0):
            raise ValueError(f"epochs must be a number >= 0, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.eval_every is not None and not self.eval_every > 0:
            raise ValueError(f"eval_every (in epochs) must be > 0, got {self.eval_every!r}")
        if self.resume and self.checkpoint is None:
            raise ValueError("resume needs a checkpoint path")

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> FitOptions:
        """The training options of a method config (fields of the same names)."""
        names = {f for f in cls.__dataclass_fields__}
        vals = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
        vals.update(overrides)
        return cls(**vals)


@dataclass
class FitResult:
    """``history``: one row per evaluation (step, epoch, lr, mean training loss since the last row,
    test accuracy in percent, wall time). ``final_test_acc``: the last evaluation's accuracy."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    steps_per_epoch: int = 0
    time_s: float = 0.0
    resumed_from: int = 0

    @property
    def final_test_acc(self) -> float:
        accs = [r["test_acc"] for r in self.history if r.get("test_acc") is not None]
        return accs[-1] if accs else math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ distributed

def world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def init_distributed(device: str = "cpu") -> bool:
    """Initialize the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): gloo on CPU, nccl
    for CUDA. Returns whether training is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    d = torch.distributed
    if not d.is_initialized():
        d.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _broadcast_object(obj: Any) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------- data

def _tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(X, Y) of a TensorDataset or an (X, Y) pair; None for another dataset."""
    if isinstance(data, torch.utils.data.TensorDataset):
        return data.tensors[0], data.tensors[1]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise ValueError(f"{what}: {len(data[0])} inputs but {len(data[1])} labels")
        return data[0], data[1]
    return None


def _length(data: Any, what: str) -> int:
    t = _tensors(data, what)
    n = len(t[1]) if t is not None else len(data)
    if n == 0:
        raise ValueError(f"the {what} data is empty")
    return n


def _batch(data: Any, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = _tensors(data, "training")
    if t is not None:
        return t[0][idx].to(device), t[1][idx].to(device)
    items = [data[int(i)] for i in idx]
    return (torch.stack([it[0] for it in items]).to(device),
            torch.as_tensor([int(it[1]) for it in items]).to(device))


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, device: str | torch.device = "cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy (percent) of ``model`` on labelled ``data`` in eval mode (mode restored)."""
    n = _length(data, "test")
    was = model.training
    model.eval()
    dev = torch.device(device)
    correct = 0
    try:
        for i in range(0, n, batch_size):
            x, y = _batch(data, torch.arange(i, min(n, i + batch_size)), dev)
            correct += int((model(x).argmax(-1) == y).sum())
    finally:
        model.train(was)
    return 100.0 * correct / n


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


# ------------------------------------------------------------------------------------ checkpoints

def _fingerprint(model: nn.Module) -> list[list[Any]]:
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                     history: list[dict[str, float]], meta: dict[str, Any]) -> None:
    payload = {
        "format": FIT_CHECKPOINT_FORMAT,
        "format_version": FIT_CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "step": step,
        "history": history,
        "rng": torch.get_rng_state(),
        "meta": meta,
    }
    files.write_stream(path, lambda f: torch.save(payload, f))


def load_fit_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The payload of a :func:`fit` checkpoint (tensors and plain data only; no code is run)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {p}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any deserialization failure means a bad file
        raise ValueError(f"{p}: corrupt or truncated training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FIT_CHECKPOINT_FORMAT:
        raise ValueError(f"{p} is not a lowbit training checkpoint")
    if payload.get("format_version", 0) > FIT_CHECKPOINT_VERSION:
        raise ValueError(f"{p} was written by a newer lowbit (format {payload['format_version']})")
    return payload


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _check_resumable(payload: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    old = payload.get("meta", {})
    first = ["model", "dataset", "method", "config"]
    for key in first + sorted((set(old) | set(meta)) - set(first)):
        if old.get(key) == meta.get(key):
            continue
        if key == "fingerprint":
            a = {k: tuple(shape) for k, shape in old.get(key) or []}
            b = {k: tuple(shape) for k, shape in meta.get(key) or []}
            diff = sorted(set(a) ^ set(b)) or sorted(k for k in a if a[k] != b.get(k))
            raise ValueError(f"cannot resume from {path}: it was written for another model (another fingerprint: "
                             f"parameters differ, e.g. {diff[0]!r})")
        raise ValueError(f"cannot resume from {path}: it was written for another {key} "
                         f"({_short(old.get(key))}; this run: {_short(meta.get(key))})")


# --------------------------------------------------------------------------------------------- fit

def _lr_at(step: int, total: int, opts: FitOptions) -> float:
    if opts.schedule == "constant" or total <= 0:
        return opts.lr
    return opts.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _eval_steps(total: int, spe: int, eval_every: float | None) -> set[int]:
    """Steps after which to evaluate: every ``eval_every`` epochs (default each epoch) and the last one."""
    every = spe * (eval_every if eval_every is not None else 1.0)
    out = {total}
    k = 1
    while round(k * every) < total:
        out.add(max(1, round(k * every)))
        k += 1
    return out


def fit(model: nn.Module, train: Any, test: Any = None, options: FitOptions | None = None,
        meta: dict[str, Any] | None = None) -> FitResult:
    """Train ``model`` in place (see the module docstring). ``train`` / ``test``: TensorDatasets, ``(X, Y)``
    pairs or map-style datasets of ``(x, y)``. ``meta``: what identifies this run (model, method,
    configuration); a checkpoint from a run with another meta is refused on resume."""
    opts = options or FitOptions()
    prev_threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        return _fit(model, train, test, opts, dict(meta or {}))
    finally:
        torch.set_num_threads(prev_threads)


def _fit(model: nn.Module, train: Any, test: Any, opts: FitOptions, meta: dict[str, Any]) -> FitResult:
    device = torch.device(opts.device)
    n = _length(train, "training")
    if test is not None:
        _length(test, "test")
    world, me = world_size(), rank()
    per_rank = n // world
    if per_rank < 1:
        raise ValueError(f"{n} training samples cannot be shared by {world} processes")
    spe = math.ceil(per_rank / opts.batch_size)
    total = round(opts.epochs * spe)
    meta = {**meta, "fingerprint": _fingerprint(model), "seed": opts.seed, "batch_size": opts.batch_size,
            "world_size": world, "steps_per_epoch": spe}
    torch.manual_seed(opts.seed)
    model.to(device)
    net: nn.Module = model
    if world > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if opts.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay)
    result = FitResult(steps_per_epoch=spe)
    start = 0
    ckpt = Path(opts.checkpoint) if opts.checkpoint is not None else None
    if opts.resume and ckpt is not None:
        payload = load_fit_checkpoint(ckpt)
        _check_resumable(payload, meta, ckpt)
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"])
        start = int(payload["step"])
        result.history = list(payload["history"])
        result.resumed_from = start
    if ckpt is not None and me == 0:
        files.check_output(ckpt)
    evals = _eval_steps(total, spe, opts.eval_every)
    stop = total if opts.max_steps is None else min(total, start + opts.max_steps)
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not opts.progress or me != 0,
               file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 30.0, leave=False)
    running, count = 0.0, 0
    perm_epoch, perm = -1, torch.empty(0, dtype=torch.long)
    net.train()
    for step in range(start, stop):
        epoch, i = divmod(step, spe)
        if epoch != perm_epoch:
            perm = _permutation(n, opts.seed, epoch)[: per_rank * world][me::world]
            perm_epoch = epoch
        x, y = _batch(train, perm[i * opts.batch_size:(i + 1) * opts.batch_size], device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, opts)
        loss = F.cross_entropy(net(x), y)
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(f"training diverged at step {step + 1} (epoch {step / spe:.2f}): the loss is "
                                     f"{float(loss)}; lower the learning rate (lr={opts.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        count += 1
        bar.update(1)
        if step + 1 in evals or step + 1 == stop:
            row = _evaluate_row(model, test, opts, step + 1, spe, running / max(count, 1), t0)
            result.history.append(row)
            running, count = 0.0, 0
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['test_acc']:.2f}" if test is not None else "-")
            if ckpt is not None and me == 0:
                _save_checkpoint(ckpt, model, opt, step + 1, result.history, meta)
            net.train()
    bar.close()
    model.eval()
    result.steps = stop
    result.time_s = time.perf_counter() - t0
    return result


def _evaluate_row(model: nn.Module, test: Any, opts: FitOptions, step: int, spe: int, loss: float,
                  t0: float) -> dict[str, float]:
    """The history row after ``step``: rank 0 evaluates; the loss is averaged over the ranks; every rank
    returns rank 0's row."""
    if world_size() > 1:
        t = torch.tensor([loss], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        loss = float(t) / world_size()
    row = None
    if rank() == 0:
        acc = None if test is None else evaluate(model, test, opts.device, opts.eval_batch_size)
        row = {"step": step, "epoch": step / spe, "lr": _lr_at(step, round(opts.epochs * spe), opts),
               "loss": loss, "test_acc": acc, "time_s": time.perf_counter() - t0}
        if opts.progress:
            shown = "" if acc is None else f", test acc {acc:.2f}%"
            tqdm.write(f"epoch {step / spe:.2f} (step {step}): loss {loss:.4f}{shown}", file=sys.stderr)
    return _broadcast_object(row)
