"""Layer-by-layer procedures on a fake-quant model (:func:`lowbit.qat.prepare_graph`), in execution order.

* :func:`capture`: the input or the output of one submodule on a batch, computing only as much of the
  network as that needs.
* :func:`correct_layers`: post-training correction (Trusov et al. 2024, methods.md §2): for each layer in
  turn, its input taken from the already quantized (and corrected) prefix and its target from the float
  network, small corrections ``ΔW``, ``Δb`` of its float weights and bias are learned by Adam to minimize the
  mean squared error of its output (its fake-quantized weights go through the straight-through rounding;
  the quantization steps stay fixed). Unlabelled calibration data only. A layer whose error would not go
  down keeps its rounding. A loss that becomes NaN or Inf is an error naming the layer.
* :func:`gradual_freeze`: convert the layers one at a time to their integer form
  (:func:`lowbit.qat.convert` with ``upto=k``) and fine-tune the layers after them with lowbit's trainer
  on labelled data (the integer prefix runs lowbit's CPU kernels; the tail shares its modules with the
  fake-quant model, so what it learns stays there).

Other layer-by-layer methods (gradual freezing of binary networks, iterative adaptation) can reuse these.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from .modules import QATLayer
from .prepare import qat_info

__all__ = ["capture", "CorrectionOptions", "correct_layers", "gradual_freeze", "layer_order"]


class _Captured(Exception):
    pass


def capture(gm: nn.Module, name: str, x: torch.Tensor, what: str = "input", batch_size: int = 512) -> torch.Tensor:
    """The input (``what="input"``, first positional argument) or the output of submodule ``name`` of ``gm`` on
    ``x``, in batches of ``batch_size``; the forward pass stops at the submodule. No gradients."""
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', got {what!r}")
    mod = gm.get_submodule(name)
    got: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach())
        raise _Captured

    def post(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
        got.append(out.detach())
        raise _Captured

    handle = mod.register_forward_pre_hook(pre) if what == "input" else mod.register_forward_hook(post)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                try:
                    gm(x[i : i + batch_size])
                except _Captured:
                    continue
                raise ValueError(f"module '{name}' is not reached by the forward pass")
    finally:
        handle.remove()
        gm.train(was_training)
    return torch.cat(got)


def layer_order(qm: fx.GraphModule) -> list[str]:
    """Names of the quantized layers of a fake-quant model, in execution order."""
    info = qat_info(qm)
    if info is None:
        raise ValueError("not a model made by lowbit.qat.prepare")
    return list(info["layers"])


@dataclass
class CorrectionOptions:
    """``steps`` Adam steps per layer on minibatches of ``batch_size`` calibration samples; learning rate
    ``lr`` times the layer's mean weight step (so corrections are measured in quantization steps), decayed by
    a cosine; ``seed`` for the minibatches."""

    steps: int = 300
    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"correction steps must be an integer >= 0, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"correction lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"correction batch size must be an integer >= 1, got {self.batch_size!r}")


@dataclass
class LayerCorrection:
    """Output MSE of one layer against the float network before (plain rounding) and after correction."""

    layer: str
    mse_rounding: float
    mse_corrected: float
    kept: bool  # the correction was kept (it lowered the error)
    history: list[float] = field(default_factory=list, repr=False)


def _mse(layer: QATLayer, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            total += float(F.mse_loss(layer(x[i : i + batch_size]), y[i : i + batch_size], reduction="sum"))
    return total / max(y.numel(), 1)


def _correct_one(name: str, layer: QATLayer, x: torch.Tensor, y: torch.Tensor, opts: CorrectionOptions,
                 gen: torch.Generator) -> LayerCorrection:
    before = _mse(layer, x, y)
    saved = copy.deepcopy(layer.layer.state_dict())
    params = [p for p in (layer.layer.weight, layer.layer.bias) if p is not None]
    step = float(layer.weight_scale().mean())
    opt = torch.optim.Adam(params, lr=opts.lr * step)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(opts.steps, 1))
    history: list[float] = []
    layer.train()
    for t in range(opts.steps):
        idx = torch.randint(0, len(x), (min(opts.batch_size, len(x)),), generator=gen)
        loss = F.mse_loss(layer(x[idx]), y[idx])
        if not torch.isfinite(loss):
            layer.layer.load_state_dict(saved)
            raise FloatingPointError(f"layer '{name}': the correction stage's loss became {float(loss.detach())} at "
                                     f"step {t} (lower correction_lr, or check the model and data for NaN/Inf)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
    layer.eval()
    after = _mse(layer, x, y)
    if not math.isfinite(after):
        layer.layer.load_state_dict(saved)
        raise FloatingPointError(f"layer '{name}': the corrected layer's output is not finite")
    kept = after < before
    if not kept:
        layer.layer.load_state_dict(saved)
    return LayerCorrection(name, before, after if kept else before, kept, history)


def correct_layers(qm: fx.GraphModule, float_gm: nn.Module, calib: torch.Tensor, opts: CorrectionOptions,
                   layers: list[str] | None = None) -> list[LayerCorrection]:
    """The correction stage (module docstring) on fake-quant model ``qm``, in place; ``float_gm``: the float
    network it was prepared from (the same submodule names: :attr:`lowbit.graph.Prepared.gm`); ``calib``:
    unlabelled input batch. Returns one :class:`LayerCorrection` per layer."""
    names = layers if layers is not None else layer_order(qm)
    gen = torch.Generator().manual_seed(int(opts.seed))
    dev = torch.device(opts.device)
    qm.to(dev)
    float_gm.to(dev)
    calib = calib.to(dev)
    out = []
    bar = tqdm(names, desc="correcting layers", unit="layer", disable=not opts.progress, leave=False)
    for name in bar:
        layer = qm.get_submodule(name)
        if not isinstance(layer, QATLayer):
            raise ValueError(f"'{name}' is not a quantized layer of this model")
        x = capture(qm, name, calib, "input")
        y = capture(float_gm, name, calib, "output")
        res = _correct_one(name, layer, x, y, opts, gen)
        bar.set_postfix_str(f"{name}: mse {res.mse_rounding:.3g} -> {res.mse_corrected:.3g}")
        out.append(res)
    return out


def gradual_freeze(qm: fx.GraphModule, train: Any, fit_options: Any, test: Any = None,
                   layers: list[str] | None = None, progress: bool = True,
                   fit: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
    """Gradual freezing (module docstring) of fake-quant model ``qm``, in place: for ``k = 1 .. L-1``, the
    first ``k`` layers become integer and the rest are fine-tuned with :func:`lowbit.trainer.fit` and
    ``fit_options`` (a :class:`lowbit.trainer.FitOptions`; its seed is offset by ``k``). Returns one row per
    step: the layer frozen and the trainer's final test accuracy (when ``test`` is given)."""
    from lowbit.qat.convert import convert

    if fit is None:
        from lowbit.trainer import fit
    names = layers if layers is not None else layer_order(qm)
    rows = []
    bar = tqdm(range(1, len(names)), desc="gradual freezing", unit="layer", disable=not progress)
    for k in bar:
        bar.set_postfix_str(f"frozen up to {names[k - 1]}")
        part = convert(qm, upto=k, rest="fake_quant")
        if not any(p.requires_grad for p in part.parameters()):
            continue
        opts = copy.copy(fit_options)
        opts.seed = int(fit_options.seed) + k
        res = fit(part, train, test, opts)
        acc = getattr(res, "final_test_acc", None)  # NaN when the trainer never evaluated: None (JSON-safe meta)
        rows.append({"frozen": names[k - 1], "layers_integer": k,
                     "test_acc": acc if acc is not None and math.isfinite(acc) else None})
    qm.eval()
    return rows
