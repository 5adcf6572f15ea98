"""What every quantization method shares: configuration, the registry, calibration data handling.

Configurations are typed dataclasses, one class per method: the config class *is* the method, so
``lowbit.quantize(model, StaticConfig(activation_observer="kl"), calib=x)`` and
``lowbit.quantize(model, "static", calib=x, activation_observer="kl")`` do the same (names are for the
command line). Granularity is an object (:class:`~lowbit.formats.PerAxis`, ...), strings such as
``"per_tensor"`` are parsed into one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from lowbit.formats.granularity import Granularity, PerAxis, PerTensor, parse_granularity

from .options import parse_fields

#: name -> Method subclass. A new method is one module that defines a subclass with @register.
METHODS: dict[str, type[Method]] = {}
#: config class -> Method subclass (each method has its own config class).
CONFIGS: dict[type, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} must set a class attribute 'name'")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    if cls.config_cls in CONFIGS:
        raise ValueError(f"{cls.config_cls.__name__} is already the config of {CONFIGS[cls.config_cls].name!r}: "
                         "give every method its own config class")
    METHODS[cls.name] = cls
    CONFIGS[cls.config_cls] = cls
    return cls


def get_method(name: str | QuantConfig | type[QuantConfig]) -> type[Method]:
    """The method of a name, of a config object or of a config class."""
    if isinstance(name, QuantConfig) or (isinstance(name, type) and issubclass(name, QuantConfig)):
        cfg_cls = name if isinstance(name, type) else type(name)
        if cfg_cls not in CONFIGS:
            raise ValueError(f"{cfg_cls.__name__} is not the config of a registered method")
        return CONFIGS[cfg_cls]
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def resolve_method(method: str | QuantConfig, config: Any = None) -> tuple[type[Method], Any]:
    """``(method class, config)`` from a method name (config separate) or a config object (the method)."""
    if isinstance(method, QuantConfig):
        if config is not None:
            raise ValueError("pass the configuration either as the method (a config object) or as config=, not both")
        return get_method(method), method
    return get_method(method), config


def _granularity_alias(obj: Any) -> None:
    """``per_channel=True/False`` (the older spelling) sets ``weight_granularity``; strings are parsed."""
    if obj.per_channel is not None:
        obj.weight_granularity = PerAxis(0) if obj.per_channel else PerTensor()
        obj.per_channel = None
    obj.weight_granularity = parse_granularity(obj.weight_granularity)


@dataclass
class LayerSettings:
    """Per-layer settings after overrides are applied. ``per_channel`` is accepted as a shorthand for
    ``weight_granularity`` (True: ``PerAxis(0)``, False: ``PerTensor()``)."""

    keep_float: bool = False
    weight_granularity: Granularity | str = field(default_factory=lambda: PerAxis(0))
    weight_observer: str = "minmax"
    per_channel: bool | None = None

    def __post_init__(self) -> None:
        _granularity_alias(self)


@dataclass
class QuantConfig:
    """Options shared by the methods.

    weight_granularity: one weight scale per output channel (``PerAxis(0)``, default) or per tensor
        (``PerTensor()``); ``per_channel=False`` is a shorthand for the latter.
    keep_float: glob patterns of layer names (as in ``model.named_modules()``) left in float32, e.g.
        ``("features.0", "classifier.*")`` keeps the first and the classifier layers float.
    overrides: pattern -> dict of :class:`LayerSettings` fields for matching layers, e.g.
        ``{"fc*": {"weight_granularity": "per_tensor"}}``; later patterns win.
    allow_float: a model in which the method finds no layer to quantize is returned as it is (float)
        instead of being an error.
    """

    weight_granularity: Granularity | str = field(default_factory=lambda: PerAxis(0))
    weight_observer: str = "minmax"
    activation_observer: str = "minmax"
    keep_float: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    calib_samples: int = 500
    calib_batch_size: int = 100
    per_channel: bool | None = None
    allow_float: bool = False

    def __post_init__(self) -> None:
        from lowbit.observers import OBSERVERS

        _granularity_alias(self)
        self.keep_float = tuple(self.keep_float) if isinstance(self.keep_float, list) else self.keep_float

        for name in ("weight_observer", "activation_observer"):
            if getattr(self, name) not in OBSERVERS:
                raise ValueError(f"{name}={getattr(self, name)!r}: unknown observer; known: {', '.join(OBSERVERS)}")
        for name in ("calib_samples", "calib_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.keep_float, str) or not all(isinstance(p, str) and p for p in self.keep_float):
            raise ValueError(f"keep_float must be a tuple of layer-name patterns, got {self.keep_float!r}")
        for pattern, values in self.overrides.items():
            if not isinstance(values, dict):
                raise ValueError(f"overrides[{pattern!r}] must be a dict of per-layer settings, got {values!r}")
            parse_fields(LayerSettings, values)  # unknown names and wrong types fail here, not per layer

    def patterns(self) -> list[tuple[str, str]]:
        """(option, pattern) of every layer-name pattern: keep_float and the override keys."""
        return [("keep_float", p) for p in self.keep_float] + [("overrides", p) for p in self.overrides]

    def layer(self, name: str) -> LayerSettings:
        s = LayerSettings(weight_granularity=self.weight_granularity, weight_observer=self.weight_observer)
        if any(fnmatch.fnmatchcase(name, p) for p in self.keep_float):
            s.keep_float = True
        known = {f.name for f in dataclasses.fields(LayerSettings)}
        for pattern, values in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                bad = set(values) - known
                if bad:
                    raise ValueError(f"unknown per-layer setting(s) {sorted(bad)}; known: {sorted(known)}")
                s = dataclasses.replace(s, **values)
        return s

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, method: str | None = None, strings: bool = False) -> QuantConfig:
        """A config from ``{field: value}``, each value checked against its field's type hint
        (:func:`lowbit.methods.options.parse_fields`; ``strings``: command-line strings to convert).
        ``keep_float`` may also be one comma-separated string."""
        vals = dict(values)
        if isinstance(vals.get("keep_float"), str):
            vals["keep_float"] = tuple(p.strip() for p in vals["keep_float"].split(",") if p.strip())
        return cls(**parse_fields(cls, vals, method=method, strings=strings))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("per_channel", None)
        d["keep_float"] = list(self.keep_float)
        d["weight_granularity"] = str(self.weight_granularity)
        return {k: (str(v) if isinstance(v, Granularity) else v) for k, v in d.items()}


@dataclass
class TrainingData:
    """Labelled data for methods that train (``Method.needs_training_data``): ``train`` and optionally
    ``test`` are datasets of ``(x, y)`` (a TensorDataset, any map-style Dataset) or ``(X, Y)`` tensor pairs."""

    train: Any
    test: Any = None


class Method:
    """A recipe that turns a float model into a quantized one. Subclasses set ``name``, ``config_cls``
    (their own config class), ``needs_calibration`` / ``needs_training_data`` and implement
    :meth:`convert`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    order: ClassVar[int] = 100  # position in listings and in "all methods"
    config_cls: ClassVar[type[QuantConfig]] = QuantConfig
    needs_calibration: ClassVar[bool] = False
    #: True for training-aware methods: :meth:`convert` then receives ``data`` (labelled training data).
    needs_training_data: ClassVar[bool] = False
    #: False: the method replaces layers in any nn.Module without tracing it (:meth:`convert_module`);
    #: True: it works on the model's graph (:meth:`convert` of a prepared torch.fx graph).
    needs_graph: ClassVar[bool] = True
    #: True for methods that use labelled training data when it is given (and work without it): their
    #: :meth:`convert` receives ``data`` (None when none was passed).
    accepts_training_data: ClassVar[bool] = False

    def __init__(self, config: QuantConfig | dict[str, Any] | None = None, **options: Any) -> None:
        if isinstance(config, dict):
            config = {**config, **options}
            options = {}
        if config is None or isinstance(config, dict):
            config = self.config_cls.from_dict(config or {}, method=self.name)
        if options:
            config = dataclasses.replace(config, **parse_fields(self.config_cls, options, method=self.name))
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{self.name} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    def convert(self, prepared: Any, calib: list[torch.Tensor], data: TrainingData | None = None) -> fx.GraphModule:
        """Quantize the prepared float graph. ``calib``: unlabelled calibration batches; ``data``: labelled
        training data, passed only to methods with ``needs_training_data``."""
        raise NotImplementedError

    def convert_module(self, model: nn.Module, calib: list[Any]) -> tuple[nn.Module, dict[str, Any]]:
        """Graph-free methods: (a copy of ``model`` with its layers replaced, meta); see module_swap."""
        raise NotImplementedError


Batch = torch.Tensor | tuple[torch.Tensor, ...]


def as_inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    """A calibration batch as the tuple of the model's inputs."""
    return batch if isinstance(batch, tuple) else (batch,)


def calibration_batches(data: Any, max_samples: int, batch_size: int, n_inputs: int = 1) -> list[Batch]:
    """Normalize calibration data to a list of batches holding at most ``max_samples`` samples.

    ``data``: a tensor [N, ...], a Dataset of ``(x, y)`` or ``x``, a DataLoader or any iterable of
    batches. One-input models (``n_inputs=1``): each batch is a float32 tensor (integer and boolean
    tensors, such as token ids, keep their dtype); a ``(x, y)`` pair gives ``x``. Models with ``n_inputs``
    inputs: each item must be a tuple/list starting with the inputs (``(x1, x2)`` or ``(x1, x2, y)``) and
    each batch is a tuple of ``n_inputs`` tensors.
    """
    if data is None:
        return []
    batches: list[Batch] = []
    seen = 0

    def split(x: Any) -> tuple[Any, ...]:
        if n_inputs == 1:
            return (x[0] if isinstance(x, (tuple, list)) else x,)
        if not isinstance(x, (tuple, list)) or len(x) < n_inputs:
            raise TypeError(f"the model takes {n_inputs} inputs: calibration items must be tuples of at least "
                            f"{n_inputs} tensors, got {type(x).__name__}")
        return tuple(x[:n_inputs])

    def take(x: Any) -> None:
        nonlocal seen
        xs = split(x)
        for t in xs:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"calibration data must hold tensors, got {type(t).__name__}")
        if len({len(t) for t in xs}) != 1:
            raise ValueError(f"calibration inputs of one batch differ in length: {[len(t) for t in xs]}")
        xs = tuple(t[: max_samples - seen].to(torch.float32) if t.is_floating_point() else t[: max_samples - seen]
                   for t in xs)  # token ids, masks stay integer
        if len(xs[0]):
            batches.append(xs[0] if n_inputs == 1 else xs)
            seen += len(xs[0])

    if isinstance(data, torch.Tensor):
        if n_inputs != 1:
            raise TypeError(f"the model takes {n_inputs} inputs; one tensor cannot be its calibration data")
        for i in range(0, min(len(data), max_samples), batch_size):
            take(data[i : i + batch_size])
    elif isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        n = min(len(data), max_samples)  # type: ignore[arg-type]
        for i in range(0, n, batch_size):
            items = [split(data[j]) for j in range(i, min(n, i + batch_size))]
            take(tuple(torch.stack([it[k] for it in items]) for k in range(len(items[0]))))
    else:
        it: Iterator[Any] = iter(data if isinstance(data, Iterable) else [data])
        for b in it:
            take(b)
            if seen >= max_samples:
                break
    return batches


def check_calibration(batches: list[Batch], example: Batch, method: str) -> None:
    if not batches:
        raise ValueError(f"method {method!r} needs calibration data, but the calibration set is empty")
    want = [tuple(t.shape[1:]) for t in as_inputs(example)]
    for b in batches:
        got = [tuple(t.shape[1:]) for t in as_inputs(b)]
        if got != want:
            raise ValueError(f"calibration sample shape {got if len(got) > 1 else got[0]} does not match the model "
                             f"input shape {want if len(want) > 1 else want[0]}")
        if not all(torch.isfinite(t).all() for t in as_inputs(b)):
            raise ValueError("calibration data contains NaN or Inf")


def layer_of(module: nn.Module) -> tuple[nn.Module, str | None]:
    """(conv/linear, fused activation) of a prepared layer module (plain or lowbit.graph.Fused)."""
    from lowbit.graph import Fused

    if isinstance(module, Fused):
        return module.layer, module.act
    return module, None


QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def is_layer(module: nn.Module | None) -> bool:
    if module is None:
        return False
    inner, _ = layer_of(module)
    return isinstance(inner, QUANTIZABLE) and getattr(inner, "padding_mode", "zeros") == "zeros"
