"""4.6-bit quantization (Trusov, Limonova, Nikolaev, Arlazarov, Mathematics 2024, 12, 651; methods.md §2)
and, through the same pipeline, its 4-bit (16 x 16 levels) and 8-bit (256 x 256 levels) baselines.

Levels. A pair ``(N_x, N_w)``: weights take ``N_w`` odd symmetric levels ``[-K_w, K_w]`` (``K_w = N_w // 2``),
activations ``N_x`` levels ``[0, N_x - 1]`` (``K_x = N_x // 2``) with a zero point, and ``K_x·K_w <= 127`` so
every product of a centred activation code and a weight code fits in int8 — what lets the 4.6-bit kernel
accumulate in int16. The paper's pairs (29, 19), (25, 21) and (23, 23) are named ``"29x19"``, ``"25x21"``,
``"23x23"``; any valid pair is accepted. ``w4`` and ``w8`` use 16 and 256 levels on both sides (weights
``[-8, 7]`` and ``[-128, 127]``) and run on the int8 kernels.

Ranges. Weights: after BatchNorm folding, the clip ``a`` is the ``1 - 1e-4`` quantile of ``|W|`` (per output
channel by default [ours]; ``weight_granularity=per_tensor`` for one per layer) and the step ``2a / N_w``
(the ``N_w`` bins tile ``[-a, a]``). Activations: the min/max of the calibration data (real zero included),
``N_x`` levels over it, so a ReLU output ``[0, max]`` uses all of them (zero point 0).

Pipeline (each stage an option; see docs/methods.md):

0. plain rounding with those ranges (``correction_steps=0`` and no training data stop here);
1. layer-wise correction, in network order (:func:`lowbit.qat.layerwise.correct_layers`): each layer's
   input from the already quantized prefix, its target from the float network, small corrections ΔW, Δb
   learned by Adam on the output MSE — unlabelled calibration data only (``correction_steps`` per layer);
2. gradual freezing (:func:`lowbit.qat.layerwise.gradual_freeze`): layers become integer one at a time and
   the layers after them are fine-tuned ``freeze_epochs`` epochs on labelled data by lowbit's trainer. It
   runs when training data is passed (``lowbit.quantize(..., train=...)``, ``lowbit compare``);
   ``freeze_epochs=0`` turns it off.

The result runs its layers on lowbit's integer kernels: for ``w46`` the 4.6-bit kernel or, per layer
shape where it measures faster (VNNI CPUs), the int8 kernel on the same codes
(:mod:`lowbit.kernels.w46_dispatch`). A layer the 4.6-bit kernel cannot take runs the int8 kernel and is
listed in ``lowbit_meta["w46"]["fallbacks"]`` with the reason. Weights are stored packed: 19-23 levels
7 per 32-bit word (4.57 bits), 16 levels in 4 bits (:mod:`lowbit.formats.packing`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from lowbit.formats.levels import Format, IntRange, odd_levels
from lowbit.quantizers import FakeQuantizer, register_initializer

from .base import Method, QuantConfig, TrainingData, register

__all__ = ["PAIRS", "parse_pair", "check_pair", "LevelsConfig", "W46Config", "W4Config", "W8Config",
           "LevelsMethod", "use_w46_kernels"]

#: The paper's (N_x, N_w) pairs, by name.
PAIRS: dict[str, tuple[int, int]] = {"29x19": (29, 19), "25x21": (25, 21), "23x23": (23, 23)}


def parse_pair(v: Any) -> tuple[int, int]:
    """``(N_x, N_w)`` from a pair, a name of :data:`PAIRS` or a string ``"25,21"`` / ``"25x21"``."""
    if isinstance(v, str):
        key = v.strip().lower().replace(" ", "")
        if key in PAIRS:
            return PAIRS[key]
        parts = key.replace("x", ",").split(",")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) != 2:
            raise ValueError(f"pair must be 'N_x,N_w' (e.g. '25,21') or one of {', '.join(PAIRS)}; got {v!r}")
        return nums[0], nums[1]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(n, int) and not isinstance(n, bool) for n in v):
        return int(v[0]), int(v[1])
    raise ValueError(f"pair must be (N_x, N_w), 'N_x,N_w' or one of {', '.join(PAIRS)}; got {v!r}")


def check_pair(n_x: int, n_w: int) -> None:
    """Raise ValueError unless both level counts are odd and >= 3 and ``K_x·K_w <= 127``."""
    for what, n in (("N_x (activation levels)", n_x), ("N_w (weight levels)", n_w)):
        if n < 3 or n % 2 == 0:
            raise ValueError(f"{what} must be odd and >= 3 for 4.6-bit quantization, got {n}")
    k_x, k_w = n_x // 2, n_w // 2
    if k_x * k_w > 127:
        most = (f"With N_w = {n_w} at most N_x = {2 * (127 // k_w) + 1}." if k_w <= 127 else
                f"No N_x >= 3 works with N_w = {n_w}: N_w is at most 255.")
        raise ValueError(f"pair (N_x, N_w) = ({n_x}, {n_w}) breaks K_x·K_w <= 127: K_x·K_w = {k_x}·{k_w} = "
                         f"{k_x * k_w} (K = N // 2; a centred activation code times a weight code must fit in "
                         f"int8). {most}")


def weight_format(n: int) -> IntRange:
    """``n`` weight levels: odd ``[-n//2, n//2]``, even ``[-n/2, n/2 - 1]`` (zero point 0 either way)."""
    return odd_levels(n) if n % 2 else IntRange(-(n // 2), n // 2 - 1, True)


@register_initializer("quantile_bins")
def _quantile_bins(x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Trusov et al.'s weight range: clip ``a`` at the ``q.clip_quantile`` (default ``1 - 1e-4``) quantile of
    ``|x|`` per parameter, step ``2a / N`` for ``N`` levels."""
    p = float(getattr(q, "clip_quantile", 1 - 1e-4))
    rows = q.granularity.rows(x).abs()
    k = max(1, min(rows.shape[1], math.ceil(p * rows.shape[1])))
    a = rows.kthvalue(k, dim=1).values
    return 2.0 * a / q.fmt.n_levels, None


@dataclass
class LevelsConfig(QuantConfig):
    """Options shared by ``w46``, ``w4`` and ``w8`` (module docstring).

    first_last: ``"same"`` (every layer at the method's levels), ``"int8"`` (the first and the last layer,
        and the first layer's input, at 255 x 256 levels on the int8 kernels) or ``"float"`` (both left float,
        as in the paper's code).
    weight_clip_quantile: the quantile of ``|W|`` that sets the weight clip.
    correction_steps / correction_lr / correction_batch_size: stage 1, per layer: Adam steps, learning rate
        in units of the layer's mean weight step, minibatch size (0 steps: plain rounding).
    freeze_epochs: stage 2, epochs of fine-tuning after each layer freezes (fractions allowed); None: 0.1
        when training data is given, else the stage is skipped; 0: off.
    lr, batch_size, optimizer, weight_decay, schedule, threads, eval_every: lowbit's trainer in stage 2.
    seed: minibatch order of both stages. device: where stage 1 runs (stage 2 runs the integer prefix on
        lowbit's CPU kernels).
    """

    first_last: str = "same"
    weight_clip_quantile: float = 1 - 1e-4
    correction_steps: int = 300
    correction_lr: float = 0.01
    correction_batch_size: int = 64
    freeze_epochs: float | None = None
    lr: float = 1e-4
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    eval_every: float | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True
    calib_samples: int = 500
    calib_batch_size: int = 250

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.first_last not in ("same", "int8", "float"):
            raise ValueError(f"first_last must be 'same', 'int8' or 'float', got {self.first_last!r}")
        if not 0.5 < self.weight_clip_quantile <= 1.0:
            raise ValueError(f"weight_clip_quantile must be in (0.5, 1], got {self.weight_clip_quantile!r}")
        for name in ("weight_observer", "activation_observer"):
            if getattr(self, name) != "minmax":
                raise ValueError(f"{name}: this method sets its own ranges (weights: a quantile clip, see "
                                 "weight_clip_quantile; activations: calibration min/max)")
        self.correction_options()  # checks steps, lr, batch size
        if self.freeze_epochs is not None and not (math.isfinite(self.freeze_epochs) and self.freeze_epochs >= 0):
            raise ValueError(f"freeze_epochs must be >= 0 (or None), got {self.freeze_epochs!r}")

    def correction_options(self) -> Any:
        from lowbit.qat.layerwise import CorrectionOptions

        return CorrectionOptions(self.correction_steps, self.correction_lr, self.correction_batch_size, self.seed,
                                 self.device, self.progress)


@dataclass
class W46Config(LevelsConfig):
    """``pair``: (N_x, N_w), e.g. ``(25, 21)``, ``"25,21"`` or ``"25x21"`` (see :data:`PAIRS`)."""

    pair: tuple[int, int] | str = (25, 21)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pair = parse_pair(self.pair)
        check_pair(*self.pair)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["pair"] = list(self.pair)  # type: ignore[arg-type]
        return d


@dataclass
class W4Config(LevelsConfig):
    """The 4-bit baseline: 16 activation levels, 16 weight levels."""


@dataclass
class W8Config(LevelsConfig):
    """The 8-bit baseline: 256 activation levels, 256 weight levels."""


class LevelsMethod(Method):
    """The pipeline of the module docstring for one level pair (``levels``; ``w46`` takes it from its config)."""

    needs_calibration = True
    accepts_training_data = True
    config_cls: ClassVar[type[QuantConfig]] = LevelsConfig
    levels: ClassVar[tuple[int, int]] = (0, 0)
    w46_kernels: ClassVar[bool] = False

    @property
    def cfg(self) -> LevelsConfig:
        assert isinstance(self.config, LevelsConfig)
        return self.config

    @property
    def pair(self) -> tuple[int, int]:
        return getattr(self.config, "pair", self.levels)

    # --- what lowbit.qat.prepare_graph asks of a method ------------------------------------------------
    def precision(self, order: list[str]) -> Any:
        n_x, n_w = self.pair
        edge = {order[0], order[-1]} if self.cfg.first_last == "int8" and order else set()
        return lambda target: (255, 256) if target in edge else (n_w, n_x)

    def weight_quantizer(self, weight: torch.Tensor, levels: int, name: str) -> FakeQuantizer:
        g = self.config.layer(name).weight_granularity
        q = FakeQuantizer(weight_format(levels), role="weight", granularity=g, param_shape=g.param_shape(weight.shape),
                          step="fixed", init="quantile_bins", name=name)
        q.clip_quantile = self.cfg.weight_clip_quantile
        return q

    def act_format(self, levels: int) -> Format:
        return IntRange(0, levels - 1, False)

    def act_quantizer(self, levels: int, signed: bool, name: str) -> FakeQuantizer:
        q = FakeQuantizer(self.act_format(levels), role="act", step="fixed", init="minmax", offset=True, name=name)
        q.offset.beta.requires_grad_(False)  # type: ignore[union-attr]  # ranges stay as calibrated
        return q

    # --- the pipeline -----------------------------------------------------------------------------------
    def _stage2_epochs(self, data: TrainingData | None) -> float:
        fe = self.cfg.freeze_epochs
        if fe is None:
            return 0.1 if data is not None and data.train is not None else 0.0
        if fe > 0 and (data is None or data.train is None):
            raise ValueError(f"freeze_epochs={fe:g}: gradual freezing trains on labelled data; pass train= "
                             "(or freeze_epochs=0)")
        return float(fe)

    def _edge_float(self, prepared: Any) -> None:
        """``first_last="float"``: the first and the last layer join ``keep_float``."""
        from lowbit.graph import layer_names

        names = [n for n in layer_names(prepared.gm) if not self.config.layer(n).keep_float]
        if names:
            extra = tuple(dict.fromkeys((names[0], names[-1])))
            self.config = dataclasses.replace(self.config, keep_float=tuple(self.config.keep_float) + extra)

    def convert(self, prepared: Any, calib: list[torch.Tensor], data: TrainingData | None = None) -> fx.GraphModule:
        from lowbit.qat import QATLayer, prepare_graph
        from lowbit.qat import convert as qat_convert
        from lowbit.qat.layerwise import correct_layers, gradual_freeze

        cfg = self.cfg
        epochs = self._stage2_epochs(data)
        if any(isinstance(b, tuple) for b in calib):
            raise ValueError(f"method {self.name!r} takes models with one input")
        if cfg.first_last == "float":
            self._edge_float(prepared)
        torch.manual_seed(cfg.seed)
        x = torch.cat(calib)
        qm = prepare_graph(prepared, self, [x])
        qm.requires_grad_(False)  # only layer weights and biases train; the quantizers' ranges stay fixed
        for m in qm.modules():
            if isinstance(m, QATLayer):
                m.layer.requires_grad_(True)
        stages: dict[str, Any] = {"rounding": True}
        if cfg.correction_steps:
            res = correct_layers(qm, prepared.gm, x, cfg.correction_options())
            qm.to("cpu")
            stages["correction"] = [{"layer": r.layer, "mse_rounding": r.mse_rounding, "mse": r.mse_corrected,
                                     "kept": r.kept} for r in res]
        if epochs > 0:
            assert data is not None
            stages["freezing"] = gradual_freeze(qm, data.train, self._fit_options(epochs), data.test,
                                                progress=cfg.progress)
        gm = qat_convert(qm)
        meta = dict(getattr(gm, "lowbit_meta", {}))
        info: dict[str, Any] = {"pair": list(self.pair), "stages": stages}
        if self.w46_kernels:
            info["kernels"], info["fallbacks"] = use_w46_kernels(gm)
        meta[self.name] = info
        meta.pop("qat", None)
        gm.lowbit_meta = meta
        return gm

    def _fit_options(self, epochs: float) -> Any:
        from lowbit.trainer import FitOptions

        return FitOptions.from_config(self.cfg, epochs=epochs, device="cpu", progress=self.cfg.progress)


@register
class W46(LevelsMethod):
    name = "w46"
    order = 40
    summary = "4.6-bit (Trusov et al.): N_x x N_w levels, K_x·K_w <= 127, layer-wise correction, gradual freezing"
    config_cls = W46Config
    w46_kernels = True


@register
class W4(LevelsMethod):
    name = "w4"
    order = 41
    summary = "the 4.6-bit pipeline at 16 x 16 levels (4-bit baseline), int8 kernels"
    config_cls = W4Config
    levels = (16, 16)


@register
class W8(LevelsMethod):
    name = "w8"
    order = 42
    summary = "the 4.6-bit pipeline at 256 x 256 levels (8-bit baseline), int8 kernels"
    config_cls = W8Config
    levels = (256, 256)


def use_w46_kernels(gm: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Move every integer layer of ``gm`` whose levels satisfy the 4.6-bit bound to the 4.6-bit kernels (in
    place). Returns ``(kernel family by layer, reason by layer for those left on the int8 kernels)``: the
    weights each layer holds (``"w46"``: 4.6-bit packed weights). Which kernel a ``"w46"`` layer then runs
    for a given input shape (the 4.6-bit one, or the int8 one on the same codes where that is faster) is
    decided when it runs: ``lowbit.runtime.plan_status(model)["steps"]`` names it."""
    from lowbit.kernels.w46 import PackedW46
    from lowbit.nn.layers import _StaticInt8

    kernels, fallbacks = {}, {}
    for name, m in gm.named_modules():
        if not isinstance(m, _StaticInt8):
            continue
        why = _w46_refusal(m)
        if why is None:
            fmt = m.packed.format
            k_x = max(1, (m.in_spec.format.qmax + 1) // 2)
            try:
                m.packed = PackedW46(m.weight_q, k_x, fmt.qmax)
            except ValueError as e:
                why = str(e)
        kernels[name] = m.packed.kernel
        if why is not None:
            fallbacks[name] = why
    return kernels, fallbacks


def _w46_refusal(m: Any) -> str | None:
    """Why the 4.6-bit kernel cannot run integer layer ``m`` (None if it can)."""
    fmt, ifmt = m.packed.format, m.in_spec.format
    if not (fmt.uniform and fmt.qmin == -fmt.qmax):
        return f"weights of {fmt} are not odd symmetric levels"
    if not ifmt.uniform or ifmt.qmin != 0:
        return f"input codes of {ifmt} are not a range [0, N_x - 1]"
    k_x, k_w = max(1, (ifmt.qmax + 1) // 2), fmt.qmax
    if k_x * k_w > 127:
        return f"{ifmt.n_levels} input levels x {fmt.n_levels} weight levels: K_x·K_w = {k_x}·{k_w} > 127"
    return None
