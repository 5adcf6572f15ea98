"""Iterative adaptation to quantization noise (Chudakov et al., IWANN 2021; docs/methods.md).

The layers are quantized one after another in execution order. Quantizing layer ``i`` sets the steps of its
weights and of the activations it produces (its output, a residual add after it; layer 0 also the model
input), on the activations of the network whose earlier layers are already quantized, by any lowbit
observer (``weight_observer``, ``activation_observer``: the whole calibration set) or step initializer
(``init`` / ``weight_init`` / ``act_init``: the first calibration batch). Then the float layers after it —
all of them (``window=None``) or the next ``window`` — are trained ``steps`` Adam steps to make the
network's output match the float network's (mean squared error of the outputs on unlabelled calibration
data; ``feature_weight`` > 0 adds the squared error of the trained layers' own outputs). Layer ``i`` and
everything before it stay frozen from then on.

The safeguard (``safeguard=True``, the default): a share ``holdout`` of the calibration samples (drawn with
``seed``) is kept out of training, and each layer's adaptation is judged by the output MSE on them, every
``check_every`` steps and after the last. The window keeps the best judged weights only if they lower that
MSE below its value before the adaptation; otherwise its weights are restored (a diverging loss is restored
too, instead of raising). A layer whose adaptation is reverted is therefore exactly sequentially calibrated,
and a run where every adaptation is reverted gives exactly the model of ``steps=0`` (the steps are set on all
calibration samples either way). ``patience`` stops a layer's training after that many checks without
improvement. Each layer's row in ``lowbit_meta["adapt"]["layers"]`` says what happened (held-out MSE before
and after, steps run, kept or reverted, why it stopped); ``reverted`` lists the reverted layers.

lowbit's reading [ours]: the steps are fixed once set (no learned steps); the first and the last layer use
``first_last_bits`` (8 by default), as the training-aware methods do; Adam's learning rate decays by a
cosine within each layer's steps; minibatches are drawn without replacement, pass after pass over the
calibration set, in an order fixed by ``seed``. The result is an integer model like any other (bits 2..8
run on the int8 kernels; weights are stored packed to their bit width).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from lowbit.formats.levels import Format, IntRange
from lowbit.graph.attrs import set_preserved
from lowbit.quantizers import INITIALIZERS, FakeQuantizer

from .base import Method, QuantConfig, as_inputs, register
from .qat import parse_bits

__all__ = ["AdaptConfig", "Adapt", "Adapter", "MAX_PASSES"]

#: a layer's steps may go this many times over the calibration set before a warning says it is too small
MAX_PASSES = 10


@dataclass
class AdaptConfig(QuantConfig):
    """Options of ``adapt`` (module docstring).

    bits: ``(weights, activations)`` bit widths in 2..8, or ``"4,4"``; first_last_bits: those of the first
        and the last layer (and the first layer's input), None for ``bits`` everywhere.
    window: how many layers after the quantized one are trained: None (or ``"all"``) for every later layer,
        ``k`` for the next ``k``.
    steps: Adam steps per layer (0: sequential calibration only); lr: Adam's learning rate; batch_size:
        calibration samples per step; feature_weight: weight of the trained layers' own output error.
    weight_observer / activation_observer: observers choosing the steps (``mse`` by default);
        init / weight_init / act_init: a step initializer instead (see ``lowbit.quantizers.INITIALIZERS``).
    safeguard: keep a layer's adaptation only if it lowers the output MSE on the held-out calibration samples
        (else its window's weights are restored); holdout: the share of the calibration samples held out of
        training for that check and for early stopping (used only when one of them is on); patience: stop a
        layer's training after this many held-out checks without improvement and keep the best checked
        weights (None: no early stopping); check_every: steps between held-out checks.
    seed: minibatch order, held-out split (and any randomness of the run); device: where the adaptation
        runs; threads: intra-op threads while it runs (None: unchanged).
    """

    weight_observer: str = "mse"
    activation_observer: str = "mse"
    calib_samples: int = 2048
    calib_batch_size: int = 256
    bits: tuple[int, int] | str = (4, 4)
    first_last_bits: int | None = 8
    window: int | str | None = None
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 64
    feature_weight: float = 0.0
    safeguard: bool = True
    holdout: float = 0.125
    patience: int | None = None
    check_every: int = 25
    init: str | None = None
    weight_init: str | None = None
    act_init: str | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bits = parse_bits(self.bits)
        for what, b in zip(("weight", "activation"), self.bits, strict=True):
            if not 2 <= b <= 8:
                raise ValueError(f"adapt quantizes to 2..8 bits: {what} bits = {b} is outside (bits={self.bits})")
        if self.first_last_bits is not None and not (
                isinstance(self.first_last_bits, int) and 2 <= self.first_last_bits <= 8):
            raise ValueError(f"first_last_bits must be in 2..8 or None, got {self.first_last_bits!r}")
        if isinstance(self.window, str):
            if self.window.strip().lower() != "all":
                raise ValueError(f"window must be a layer count >= 1 or 'all'/None, got {self.window!r}")
            self.window = None
        if self.window is not None and (isinstance(self.window, bool) or self.window < 1):
            raise ValueError(f"window must be a layer count >= 1 or 'all'/None, got {self.window!r}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'steps' else 1}, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.holdout, (int, float)) and 0 < self.holdout < 1):
            raise ValueError(f"holdout is the share of calibration samples held out, in (0, 1); got {self.holdout!r}")
        for name, v in (("patience", self.patience), ("check_every", self.check_every)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1{' or None' if name == 'patience' else ''}, got {v!r}")
        if not (math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight!r}")
        for name in ("init", "weight_init", "act_init"):
            v = getattr(self, name)
            if v is not None and v not in INITIALIZERS:
                raise ValueError(f"{name}={v!r} is not a step initializer; known: {', '.join(sorted(INITIALIZERS))}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")

    def rules(self) -> tuple[Any, Any]:
        """(weight range rule, activation range rule): an initializer where one is named, else the observer."""
        from lowbit.qat.stages import RangeRule

        w = self.weight_init or self.init
        a = self.act_init or self.init
        return (RangeRule("init", w) if w else RangeRule("observer", self.weight_observer),
                RangeRule("init", a) if a else RangeRule("observer", self.activation_observer))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["bits"] = list(self.bits)  # type: ignore[arg-type]
        return d


@register
class Adapt(Method):
    name = "adapt"
    order = 45
    summary = "layer by layer: quantize a layer, adapt the float layers after it to the noise (unlabelled data)"
    config_cls = AdaptConfig
    needs_calibration = True

    @property
    def cfg(self) -> AdaptConfig:
        assert isinstance(self.config, AdaptConfig)
        return self.config

    # --- what lowbit.qat.prepare_graph asks of a method ------------------------------------------------
    def precision(self, order: list[str]) -> Any:
        w, a = self.cfg.bits  # type: ignore[misc]
        fl = self.cfg.first_last_bits
        edge = {order[0], order[-1]} if fl is not None and order else set()
        return lambda target: (fl, fl) if target in edge else (w, a)

    def weight_quantizer(self, weight: torch.Tensor, bits: int, name: str) -> FakeQuantizer:
        g = self.config.layer(name).weight_granularity
        return FakeQuantizer(IntRange.signed_bits(bits), role="weight", granularity=g,
                             param_shape=g.param_shape(weight.shape), step="fixed", init="minmax", name=name)

    def act_format(self, bits: int, signed: bool) -> Format:
        return IntRange.signed_bits(bits) if signed else IntRange(0, (1 << bits) - 1, True)

    def act_quantizer(self, bits: int, signed: bool, name: str) -> FakeQuantizer:
        return FakeQuantizer(self.act_format(bits, signed), role="act", step="fixed", init="minmax", name=name)

    # --- the recipe --------------------------------------------------------------------------------------
    def fake_quant(self, prepared: Any, calib: list[Any]) -> fx.GraphModule:
        """The fake-quant model of a prepared float graph with this method's quantizers (their steps are set
        layer by layer later, by :class:`Adapter`)."""
        from lowbit.qat import prepare_graph

        return prepare_graph(prepared, self, calib)

    def convert(self, prepared: Any, calib: list[torch.Tensor]) -> fx.GraphModule:
        from lowbit.qat import convert

        cfg = self.cfg
        t0 = time.perf_counter()
        with _threads(cfg.threads):
            torch.manual_seed(cfg.seed)
            qm = self.fake_quant(prepared, calib)
            log = Adapter(qm, prepared.gm, calib, cfg).run()
            out = convert(qm)
        meta = dict(out.lowbit_meta)
        meta["adapt"] = {"wall_time_s": time.perf_counter() - t0, "window": cfg.window, "steps": cfg.steps,
                         "calib_samples": sum(len(as_inputs(b)[0]) for b in calib), "safeguard": cfg.safeguard,
                         "patience": cfg.patience, "reverted": [r["layer"] for r in log if not r["kept"]],
                         "layers": log}
        set_preserved(out, "lowbit_meta", meta)
        return out


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------- the loop

def _units(qm: fx.GraphModule) -> list[tuple[str, list[nn.Parameter]]]:
    """(module name, trainable parameters) of every module with parameters, in graph order: a quantized
    layer's float weights and bias (not its quantizer), any float module's own parameters."""
    from lowbit.qat.modules import PoolRequant, QATLayer

    out: list[tuple[str, list[nn.Parameter]]] = []
    seen: set[str] = set()
    for n in qm.graph.nodes:
        if n.op != "call_module" or str(n.target) in seen:
            continue
        seen.add(str(n.target))
        mod = qm.get_submodule(str(n.target))
        if isinstance(mod, (FakeQuantizer, PoolRequant)):
            continue
        params = list((mod.layer if isinstance(mod, QATLayer) else mod).parameters())
        if params:
            out.append((str(n.target), [p for p in params if p.requires_grad]))
    return out


def _stack(calib: list[Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    xs = [as_inputs(b) for b in calib]
    return tuple(torch.cat([x[k] for x in xs]).to(device) for k in range(len(xs[0])))


@torch.no_grad()
def _outputs(model: nn.Module, xs: tuple[torch.Tensor, ...], batch: int = 512) -> torch.Tensor:
    return torch.cat([model(*(x[i:i + batch] for x in xs)) for i in range(0, len(xs[0]), batch)])


@torch.no_grad()
def _mse(model: nn.Module, xs: tuple[torch.Tensor, ...], target: torch.Tensor, batch: int = 512) -> float:
    total = sum(float(F.mse_loss(model(*(x[i:i + batch] for x in xs)), target[i:i + batch], reduction="sum"))
                for i in range(0, len(target), batch))
    return total / max(target.numel(), 1)


class _Minibatches:
    """Indices of ``batch`` samples out of ``n``: passes over a permutation drawn from one generator."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch = n, min(batch, n)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx


class _Features:
    """Outputs of the trained layers (the float conv/linear inside each) in the student and the teacher."""

    def __init__(self, qm: fx.GraphModule, teacher: nn.Module, names: list[str]) -> None:
        from lowbit.methods.base import layer_of
        from lowbit.qat.modules import QATLayer

        self.got: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
        self.handles = []
        for name in names:
            s, t = qm.get_submodule(name), teacher.get_submodule(name)
            s = s.layer if isinstance(s, QATLayer) else layer_of(s)[0]
            t = layer_of(t)[0]
            self.handles.append(s.register_forward_hook(lambda _m, _a, y: self.got["s"].append(y)))
            self.handles.append(t.register_forward_hook(lambda _m, _a, y: self.got["t"].append(y)))

    def loss(self) -> torch.Tensor:
        s, t = self.got["s"], self.got["t"]
        self.got = {"s": [], "t": []}
        return sum((F.mse_loss(a, b) for a, b in zip(s, t, strict=True)), torch.zeros(())) / max(len(s), 1)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _split(n: int, cfg: AdaptConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) sample indices: ``cfg.holdout`` of the ``n`` calibration samples, drawn with
    ``cfg.seed``, are held out when the safeguard or early stopping judges the adaptation; else none."""
    everything = torch.arange(n)
    if cfg.steps == 0 or not (cfg.safeguard or cfg.patience is not None):
        return everything, everything[:0]
    held = round(cfg.holdout * n)
    if held < 1 or held >= n:
        raise ValueError(f"adapt holds out {cfg.holdout:g} of the calibration samples to judge each layer's "
                         f"adaptation (safeguard / patience), which leaves {held} held out and {n - held} to train on "
                         f"from {n} samples; pass more calibration data, another holdout, or safeguard=False and "
                         "patience=None")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(cfg.seed) + 7919))
    return perm[held:].sort().values, perm[:held].sort().values


def _check(units: list[tuple[str, list[nn.Parameter]]], first: str, n: int, n_held: int, cfg: AdaptConfig) -> None:
    if cfg.steps == 0:
        return
    names = [u for u, _ in units]
    later = units[names.index(first) + 1:]
    if not any(params for _, params in later):
        shown = ", ".join(u for u, _ in later) or "none"
        raise ValueError(f"adapt trains the layers after each quantized layer, but no layer after the first one "
                         f"('{first}') has trainable parameters (later layers with parameters: {shown}); "
                         "use steps=0 (sequential calibration) or a post-training method such as static")
    passes = cfg.steps * min(cfg.batch_size, n) / n
    held = f" ({n_held} more held out)" if n_held else ""
    if passes > MAX_PASSES:
        warnings.warn(f"adapt: {cfg.steps} steps of {min(cfg.batch_size, n)} samples per layer go {passes:.0f} times "
                      f"over the {n} calibration samples it trains on{held} (more than {MAX_PASSES}): the adapted "
                      f"layers may overfit them; pass more calibration data (calib_samples, at most "
                      f"{cfg.calib_samples} are used) or use fewer steps", UserWarning, stacklevel=5)


class Adapter:
    """The procedure of the module docstring on fake-quant model ``qm`` (made by
    :func:`lowbit.qat.prepare_graph` with ``adapt``'s quantizers), in place, one layer at a time:
    :meth:`quantize` sets layer ``i``'s steps, :meth:`adapt` trains the layers after it, :meth:`run` does both
    for every layer. ``teacher``: the float network ``qm`` was prepared from (same module names); ``calib``:
    unlabelled calibration batches. Parameters are trainable only while :meth:`adapt` trains them."""

    def __init__(self, qm: fx.GraphModule, teacher: nn.Module, calib: list[Any], cfg: AdaptConfig) -> None:
        from lowbit.qat.stages import staging

        self.qm, self.teacher, self.cfg = qm, teacher.eval(), cfg
        self.dev = torch.device(cfg.device)
        self.st = staging(qm)
        self.units = _units(qm)
        xs = _stack(calib, torch.device("cpu"))
        self.n = len(xs[0])
        train, held = _split(self.n, cfg)
        _check(self.units, self.st.layers[0], len(train), len(held), cfg)
        self.was = {p: p.requires_grad for p in qm.parameters()}
        for p in qm.parameters():
            p.requires_grad_(False)
        target = _outputs(self.teacher, xs)
        self.xs = tuple(x.to(self.dev) for x in xs)  # every sample sets the steps (observers, initializers)
        self.train_xs = tuple(x[train].to(self.dev) for x in xs)  # the adaptation trains on these
        self.target = target[train].to(self.dev)
        self.held_xs = tuple(x[held].to(self.dev) for x in xs)  # and is judged on these (if any held out)
        self.held_target = target[held].to(self.dev)
        qm.to(self.dev)
        self.teacher.to(self.dev)
        size = cfg.calib_batch_size
        batches = [tuple(x[i:i + size] for x in self.xs) for i in range(0, self.n, size)]
        self.batches = [b[0] if len(b) == 1 else b for b in batches]
        self.minibatches = _Minibatches(len(train), cfg.batch_size, cfg.seed)
        self.rules = cfg.rules()
        self.log: list[dict[str, Any]] = []

    @property
    def layers(self) -> list[str]:
        return self.st.layers

    def view(self, i: int) -> fx.GraphModule:
        """The model with layers ``0..i`` quantized (weights and the activations they produce), float after."""
        from lowbit.qat.stages import staged_view

        return staged_view(self.qm, set(self.st.layers[: i + 1]), self.st.acts_upto(i + 1))

    def window(self, i: int) -> list[tuple[str, list[nn.Parameter]]]:
        """The modules trained after layer ``i`` is quantized, with their trainable parameters."""
        names = [u for u, _ in self.units]
        after = self.units[names.index(self.st.layers[i]) + 1:]
        return after if self.cfg.window is None else after[: self.cfg.window]

    def mse(self, i: int, view: nn.Module | None = None) -> float:
        """Output MSE against the teacher, layers ``0..i`` quantized, on the held-out calibration samples (on
        the training samples when none are held out)."""
        view = self.view(i) if view is None else view
        if len(self.held_target):
            return _mse(view, self.held_xs, self.held_target)
        return _mse(view, self.train_xs, self.target)

    def quantize(self, i: int) -> None:
        from lowbit.qat.stages import calibrate_stage

        calibrate_stage(self.qm, self.st, i, self.batches, *self.rules)

    def adapt(self, i: int, steps: int | None = None) -> dict[str, Any]:
        """Train the window after layer ``i`` (``steps``: default the config's). Returns what happened:
        ``trained`` (the modules trained), ``steps`` (run), ``mse_quantized`` / ``mse_adapted`` (:meth:`mse`
        before training and of the weights kept), ``kept`` (False: the safeguard restored the weights the
        window had before), ``stopped`` (why training ended early: ``"patience"``, ``"diverged"``, or None)."""
        steps = self.cfg.steps if steps is None else steps
        window = [(u, ps) for u, ps in self.window(i) if ps]
        view = self.view(i)
        before = self.mse(i, view)
        row: dict[str, Any] = {"trained": [], "steps": 0, "mse_quantized": before, "mse_adapted": before,
                               "kept": True, "stopped": None}
        if not (window and steps):
            return row
        row["trained"] = [u for u, _ in window]
        judge = _Judge(self, i, view, [self.qm.get_submodule(u) for u, _ in window], before)
        params = [p for _, ps in window for p in ps]
        row["steps"], row["stopped"] = _train(view, self, params, row["trained"], steps, self.st.layers[i], judge)
        row["mse_adapted"], row["kept"] = judge.finish()
        return row

    def run(self) -> list[dict[str, Any]]:
        """Quantize and adapt every layer in turn; one row per layer: its name and what :meth:`adapt` did."""
        bar = tqdm(self.st.layers, desc="adapting layers", unit="layer", disable=not self.cfg.progress)
        try:
            for i, name in enumerate(bar):
                self.quantize(i)
                row = self.adapt(i)
                note = "" if row["kept"] else " (reverted)"
                bar.set_postfix_str(f"{name}: mse {row['mse_quantized']:.3g} -> {row['mse_adapted']:.3g}{note}")
                self.log.append({"layer": name, **row})
        finally:
            self.close()
        return self.log

    def close(self) -> None:
        """Restore the parameters' ``requires_grad`` and move the models back to the CPU."""
        for p, w in self.was.items():
            p.requires_grad_(w)
        self.qm.cpu().eval()
        self.teacher.cpu()


class _Judge:
    """The held-out checks of one layer's adaptation: the best weights of the window so far (with the
    safeguard, the weights before training are a candidate too) and when to stop (``patience``)."""

    def __init__(self, ad: Adapter, i: int, view: nn.Module, modules: list[nn.Module], before: float) -> None:
        self.ad, self.i, self.view, self.modules = ad, i, view, modules
        cfg = ad.cfg
        self.on = cfg.safeguard or cfg.patience is not None
        self.best = before if cfg.safeguard else math.inf
        self.state = self._save() if cfg.safeguard else None
        self.from_start = cfg.safeguard  # True while the best weights are those before training
        self.stale = 0

    def _save(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]

    def check(self) -> bool:
        """Judge the current weights on the held-out samples; True: stop training (patience ran out)."""
        if not self.on:
            return False
        mse = self.ad.mse(self.i, self.view)
        if mse < self.best:
            self.best, self.state, self.from_start, self.stale = mse, self._save(), False, 0
        else:
            self.stale += 1
        return self.ad.cfg.patience is not None and self.stale >= self.ad.cfg.patience

    def finish(self) -> tuple[float, bool]:
        """Load the best judged weights; (their held-out MSE, whether they are adapted ones)."""
        if not self.on:
            return self.ad.mse(self.i, self.view), True
        if self.state is not None:
            with torch.no_grad():
                for m, sd in zip(self.modules, self.state, strict=True):
                    m.load_state_dict(sd)
        return self.best, not self.from_start


def _train(view: fx.GraphModule, ad: Adapter, params: list[nn.Parameter], window: list[str], steps: int,
           layer: str, judge: _Judge) -> tuple[int, str | None]:
    """Adam on the output MSE for up to ``steps`` steps, judged every ``check_every`` steps and after the last;
    (steps run, why training ended early: "patience", "diverged" (with the safeguard; else an error), or None)."""
    cfg = ad.cfg
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    feats = _Features(ad.qm, ad.teacher, window) if cfg.feature_weight > 0 else None
    view.train()
    try:
        for t in range(steps):
            idx = ad.minibatches.next().to(ad.target.device)
            x = tuple(v[idx] for v in ad.train_xs)
            loss = F.mse_loss(view(*x), ad.target[idx])
            if feats is not None:
                with torch.no_grad():
                    ad.teacher(*x)
                loss = loss + cfg.feature_weight * feats.loss()
            if not torch.isfinite(loss):
                if cfg.safeguard:  # the judge restores the best weights judged so far (at worst, those before)
                    return t, "diverged"
                raise FloatingPointError(f"adapt: the loss became {float(loss.detach())} at step {t} after quantizing "
                                         f"layer '{layer}' (lower lr, or check the model and data for NaN/Inf)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (t + 1) % cfg.check_every == 0 or t + 1 == steps:
                view.eval()
                stop = judge.check()
                view.train()
                if stop and t + 1 < steps:
                    return t + 1, "patience"
        return steps, None
    finally:
        view.eval()
        if feats is not None:
            feats.close()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
