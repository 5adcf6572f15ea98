"""``lowbit.binary.train``: train a fake-binary model with lowbit's trainer, stage by stage.

``freeze="gradual"``: for each stage (:mod:`lowbit.binary.stages`) switch its binarizers on, train for its
``stage_epochs`` with :func:`lowbit.trainer.fit` (a fresh optimizer and learning-rate schedule over the
parameters that still train; UBQ's ``δ`` anneals over the first ``anneal_fraction`` of the stage's steps), then
freeze the layer. ``freeze="none"``: every binarizer on, one run of ``epochs`` (``δ`` annealed over the first
``anneal_fraction`` of it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .prepare import binary_info
from .stages import begin_all, begin_stage, end_stage

__all__ = ["BinaryTrainResult", "train", "config_of"]


@dataclass
class BinaryTrainResult:
    """``history``: the trainer's evaluation rows, ``epoch`` counted from the start of the first stage and
    ``stage`` added; ``stages``: per stage its layer, epochs and test accuracy at its end."""

    history: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    time_s: float = 0.0

    @property
    def final_test_acc(self) -> float | None:
        accs = [r["test_acc"] for r in self.history if r.get("test_acc") is not None]
        return accs[-1] if accs else None


def config_of(model: nn.Module) -> Any:
    """The method config a fake-binary model was prepared with."""
    from lowbit.methods import get_method

    info = binary_info(model)
    if info is None:
        raise ValueError("this model was not made by lowbit.binary.prepare")
    cls = get_method(info["method"])
    return cls.config_cls.from_dict(info["config"], method=info["method"])


def _n_samples(data: Any) -> int:
    if isinstance(data, torch.utils.data.TensorDataset):
        return len(data.tensors[0])
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return len(data[0])
    return len(data)


def train(model: nn.Module, train_data: Any, test_data: Any = None, **overrides: Any) -> BinaryTrainResult:
    """Train ``model`` (from :func:`lowbit.binary.prepare`) in place by its config's schedule (see the module
    docstring). ``overrides``: :class:`~lowbit.trainer.FitOptions` fields for every stage (``progress``,
    ``eval_every``, ``threads``, ``device``, ...). Returns the history; the model ends in eval mode."""
    from lowbit.trainer import FitOptions, fit, world_size

    info = binary_info(model)
    if info is None:
        raise ValueError("lowbit.binary.train takes a model made by lowbit.binary.prepare")
    cfg = config_of(model)
    base = FitOptions.from_config(cfg, **overrides)
    spe = -(-(_n_samples(train_data) // world_size()) // base.batch_size)
    frac = float(getattr(cfg, "anneal_fraction", 1.0))
    result = BinaryTrainResult()
    t0 = time.perf_counter()
    if cfg.freeze == "none":
        begin_all(model, max(1, round(frac * cfg.epochs * spe)))
        res = fit(model, train_data, test_data, base)
        result.history = [{**r, "stage": None} for r in res.history]
        for b in _binarizers(model):
            b.finish()
    else:
        offset = 0.0
        for k, stage in enumerate(info["stages"]):
            e = float(stage["epochs"])
            begin_stage(model, k, max(1, round(frac * e * spe)))
            acc = None
            if e > 0:
                opts = FitOptions.from_config(cfg, **{**overrides, "epochs": e, "seed": cfg.seed + k})
                res = fit(model, train_data, test_data, opts)
                result.history += [{**r, "epoch": r["epoch"] + offset, "stage": k} for r in res.history]
                acc = res.final_test_acc
            end_stage(model, k)
            result.stages.append({"layer": stage["layer"], "epochs": e, "test_acc": acc})
            offset += e
    info["trained"] = True
    result.time_s = time.perf_counter() - t0
    model.eval()
    return result


def _binarizers(model: nn.Module) -> list[Any]:
    from lowbit.quantizers import Binarizer

    return [m for m in model.modules() if isinstance(m, Binarizer)]
