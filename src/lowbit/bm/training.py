"""BM training as the authors do it, and the integer BM model.

:func:`train_layerwise` (methods.md §4): convert layer 1 of a trained float network to BM, train the
whole network a few epochs, convert layer 2, train, ... (in execution order), then fine-tune the whole
BM network. Training is :func:`lowbit.train.train` (AdamW, cosine decay, progress bars, test accuracy
after every epoch); BatchNorm layers stay and keep learning, which re-normalizes each converted
layer's outputs. With ``temperature > 0`` the converted layers use the soft max, its temperature
annealed linearly to 0 over the conversion stages; fine-tuning always uses the hard max.

:func:`quantize_bm`: the integer BM model: BatchNorm folded into the BM layers, ReLU fused,
activation ranges calibrated, BM layers -> ``lowbit.nn.QBMConv2d`` / ``QBMLinear`` (log-domain codes,
:mod:`lowbit.bm.integer`), everything else as lowbit's static int8 method does it.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from lowbit.data import DatasetSplits

from .convert import bm_layers, convert, execution_order, select_layers, set_options
from .layers import BMLayer

__all__ = ["BMTrainConfig", "train_layerwise", "quantize_bm"]


@dataclass
class BMTrainConfig:
    """Layer-by-layer conversion training (see the module docstring).

    layers: layer names / glob patterns to convert (None: every conv/linear layer BM supports).
    epochs_per_layer: training epochs after each conversion; finetune_epochs: epochs at the end.
    train_fraction: share of the training set each of those epochs sees (a fixed random subset per
        stage), to bound the cost on large datasets; 1.0 = all of it.
    lr / finetune_lr: AdamW learning rates (finetune_lr None: lr / 2).
    temperature: initial soft-max temperature (0: hard max throughout).
    eps: conversion floor of the weights (``v = ln max(±W, eps)``).
    """

    layers: tuple[str, ...] | None = None
    epochs_per_layer: int = 1
    finetune_epochs: int = 2
    train_fraction: float = 1.0
    lr: float = 1e-3
    finetune_lr: float | None = None
    batch_size: int = 64
    temperature: float = 0.0
    eps: float = 1e-6
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = tuple(p for p in self.layers.split(",") if p)
        if self.epochs_per_layer < 0 or self.finetune_epochs < 0:
            raise ValueError("epochs must be >= 0")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if not (self.lr > 0 and (self.finetune_lr is None or self.finetune_lr > 0)):
            raise ValueError("learning rates must be > 0")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _subset(splits: DatasetSplits, fraction: float, seed: int) -> DatasetSplits:
    if fraction >= 1.0:
        return splits
    x, y = splits.train.tensors[0], splits.train.tensors[1]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[: max(1, round(fraction * len(y)))]
    return dataclasses.replace(splits, train=TensorDataset(x[idx], y[idx]))


def _set_temperature(model: nn.Module, t: float) -> None:
    for m in model.modules():
        if isinstance(m, BMLayer):
            m.temperature = t


def train_layerwise(
    model: nn.Module,
    splits: DatasetSplits,
    config: BMTrainConfig | None = None,
    progress: bool = True,
    **options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Convert ``model`` (a trained float network; not modified) to BM layer by layer, training after
    each conversion, then fine-tune. Returns ``(bm_model in eval mode, history)``; history holds one
    record per stage (``stage``, ``layer``, ``epochs``, ``test_acc``, ``time_s``), ``float_acc`` and
    ``bm_acc`` (test accuracy before and after) and ``time_s``."""
    from lowbit.train import accuracy, train

    cfg = config or BMTrainConfig()
    if options:
        cfg = dataclasses.replace(cfg, **options)
    t0 = time.perf_counter()
    model = copy.deepcopy(model)
    names = select_layers(model, cfg.layers)
    if not names:
        raise ValueError("the model has no layer BM conversion supports (nn.Linear, nn.Conv2d)")
    example = splits.train.tensors[0][:1]
    names = execution_order(model, example, names)
    hist: dict[str, Any] = {"config": dataclasses.asdict(cfg), "layers": names, "stages": []}
    hist["float_acc"] = accuracy(model, splits.test)
    bar = tqdm(names, desc="BM conversion", unit="layer", disable=not progress, file=sys.stderr)
    for i, name in enumerate(bar):
        bar.set_postfix_str(name)
        convert(model, [name], eps=cfg.eps, inplace=True)
        _set_temperature(model, cfg.temperature * (len(names) - i) / len(names))
        s0 = time.perf_counter()
        h = train(model, _subset(splits, cfg.train_fraction, cfg.seed + i), cfg.epochs_per_layer, lr=cfg.lr,
                  batch_size=cfg.batch_size, seed=cfg.seed + i, progress=progress, threads=cfg.threads)
        acc = h["final_test_acc"]
        hist["stages"].append({"stage": f"convert {name}", "layer": name, "epochs": cfg.epochs_per_layer,
                               "test_acc": acc, "time_s": time.perf_counter() - s0})
        if progress:
            tqdm.write(f"converted {name} ({i + 1}/{len(names)}): test accuracy {acc:.2f}%", file=sys.stderr)
    _set_temperature(model, 0.0)
    if cfg.finetune_epochs:
        s0 = time.perf_counter()
        h = train(model, _subset(splits, cfg.train_fraction, cfg.seed + len(names)), cfg.finetune_epochs,
                  lr=cfg.finetune_lr or cfg.lr / 2, batch_size=cfg.batch_size, seed=cfg.seed + len(names),
                  progress=progress, threads=cfg.threads)
        hist["stages"].append({"stage": "fine-tune", "layer": None, "epochs": cfg.finetune_epochs,
                               "test_acc": h["final_test_acc"], "time_s": time.perf_counter() - s0})
    model.eval()
    hist["bm_acc"] = accuracy(model, splits.test)
    hist["time_s"] = time.perf_counter() - t0
    return model, hist


def quantize_bm(
    model: nn.Module,
    calib: Any,
    example_input: torch.Tensor | None = None,
    code_bits: int | None = None,
    log_step_bits: int | None = None,
    activation_observer: str = "minmax",
    progress: bool = False,
) -> fx.GraphModule:
    """The integer BM model of a (trained) BM model: see the module docstring. ``code_bits`` /
    ``log_step_bits`` override the layers' own settings. Layers left float (not converted to BM) become
    int8 layers, as in lowbit's static method. ``lowbit_meta['method']`` is ``"bm"``."""
    from lowbit.methods import quantize

    if not bm_layers(model):
        raise ValueError("the model has no BM layer: convert it first (lowbit.bm.convert / train_layerwise)")
    opts = {k: v for k, v in (("code_bits", code_bits), ("log_step_bits", log_step_bits)) if v is not None}
    if opts:
        model = copy.deepcopy(model)
        set_options(model, **opts)
    gm = quantize(model, "static", calib=calib, example_input=example_input,
                  config={"activation_observer": activation_observer, "progress": progress})
    bits = sorted({m.code_bits for m in model.modules() if isinstance(m, BMLayer)})
    meta = dict(gm.lowbit_meta)
    meta.update(method="bm", bm={"code_bits": bits, "layers": bm_layers(model)})
    gm.lowbit_meta = meta
    return gm
