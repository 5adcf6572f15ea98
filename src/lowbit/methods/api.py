"""``lowbit.quantize``: one call from a float model to a quantized one."""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any

import torch
from torch import nn

from lowbit.graph import layer_names, prepare
from lowbit.graph.attrs import set_preserved
from lowbit.graph.capture import input_checks, restore_input_checks
from lowbit.kernels.threads import guard_model
from lowbit.runtime import install as install_executor

from .base import (
    METHODS,
    Batch,
    QuantConfig,
    TrainingData,
    as_inputs,
    calibration_batches,
    check_calibration,
    resolve_method,
)
from .module_swap import NoQuantizableLayerError


def available_methods() -> list[str]:
    return sorted(METHODS, key=lambda n: (METHODS[n].order, n))


def quantize(
    model: nn.Module,
    method: str | QuantConfig,
    calib: Any = None,
    config: QuantConfig | dict[str, Any] | None = None,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    train: Any = None,
    test: Any = None,
    **options: Any,
) -> nn.Module:
    """Quantize ``model`` by ``method``: a name (see :func:`available_methods`) or a config object, whose
    class names the method (``lowbit.quantize(model, StaticConfig(activation_observer="kl"), calib=x)``).

    calib: calibration data (tensor [N, ...], Dataset, DataLoader or iterable of batches); needed by
    methods that calibrate activation ranges. example_input: one input batch (defaults to the first
    calibration sample); for a model with several inputs, the tuple of them (``(x, y)`` for
    ``forward(x, y)``), and then every calibration item is a tuple starting with the inputs
    (``(x, y)`` or ``(x, y, label)``). train / test: labelled data (datasets of ``(x, y)``) for
    training-aware methods (``lsq``, ``lsq_plus``, ``apot``, ...), which fine-tune the model, and for methods
    that use it when given (the gradual freezing stage of ``w46``, ``w4``, ``w8``); ``test`` is only reported.
    Returns an ``nn.Module`` (a torch.fx GraphModule) whose ``lowbit_meta`` says its method, configuration,
    input/output formats and which layers stayed float. A layer-name pattern (``keep_float``, ``overrides``)
    that matches no layer is warned about.

    Methods that need no graph (``dynamic``, ``weight_only``, ``float16``) take any ``nn.Module`` (Hugging
    Face transformers, recurrent nets, Python control flow): they return a copy of the model with its
    layers replaced in place (see :mod:`lowbit.methods.module_swap`); ``example_input`` is then optional
    (used to check the result runs, and by :func:`lowbit.save` to capture the model as a graph). A model
    with no layer the method can quantize is a :class:`NoQuantizableLayerError` unless ``allow_float=True``.
    """
    cls, config = resolve_method(method, config)
    m = cls(config, **options)
    n_inputs = len(example_input) if isinstance(example_input, (tuple, list)) else 1
    if isinstance(example_input, list):
        example_input = tuple(example_input)
    batches = calibration_batches(calib, m.config.calib_samples, m.config.calib_batch_size, n_inputs)
    if example_input is None and batches:
        example_input = _first_sample(batches[0])
    if cls.needs_calibration:
        check_calibration(batches, example_input, cls.name)
    if cls.needs_training_data and train is None:
        raise ValueError(f"method {cls.name!r} trains the model: pass labelled training data as train=")
    if not cls.needs_graph:
        return _quantize_modules(model, m, batches, example_input)
    if example_input is None:
        raise ValueError("pass example_input (one input batch) or calibration data to trace the model")
    checks = input_checks(model)
    prepared = prepare(model, example_input)
    _warn_unmatched(m.config, layer_names(prepared.gm))
    if cls.needs_training_data:
        gm = m.convert(prepared, batches, data=TrainingData(train, test))
    elif cls.accepts_training_data:
        gm = m.convert(prepared, batches, data=None if train is None else TrainingData(train, test))
    else:
        gm = m.convert(prepared, batches)
    meta = dict(getattr(gm, "lowbit_meta", {}))
    meta.update(method=cls.name, config=m.config.to_dict(), unsupported=list(prepared.unsupported),
                input_shape=list(_first_sample_shape(example_input)))
    _check_quantized(gm, cls.name, m.config, layer_names(prepared.gm))
    restore_input_checks(gm, checks, meta.get("input"))
    set_preserved(gm, "lowbit_meta", meta)  # kept by copy.deepcopy and pickling
    gm.eval()
    guard_model(gm)  # torch single-threaded while it runs, lowbit's pool at the user's count
    install_executor(gm)  # model(x) runs a native plan when every op has one (lowbit.runtime)
    _check_runs(gm, example_input, cls.name)
    set_preserved(gm, "lowbit_example", _small(example_input))
    return gm


def _first_sample_shape(example: Batch) -> tuple[int, ...]:
    """Shape of one sample of the (first) input: what ``lowbit info FILE`` needs to count operations."""
    return tuple(as_inputs(example)[0].shape[1:])


def _quantize_modules(model: nn.Module, m: Any, batches: list[Batch], example: Batch | None) -> nn.Module:
    """Graph-free methods: layers replaced in a copy of the model (any nn.Module, no tracing)."""
    qm, meta = m.convert_module(model, batches)
    _warn_unmatched(m.config, meta["quantized_layers"] + meta["float_layers"])
    if not meta["quantized_layers"] and not m.config.allow_float:
        why = "; ".join(f"'{k}': {v}" for k, v in meta["float_reasons"].items())
        raise NoQuantizableLayerError(
            f"{m.name} found no layer to quantize in {type(model).__name__}"
            + (f" (left float: {why})" if why else " (it quantizes Linear, Conv1d/Conv2d, Embedding, LSTM/GRU/RNN "
               "and MultiheadAttention layers)")
            + "; pass allow_float=True to get the float model back")
    meta.update(method=m.name, config=m.config.to_dict())
    if example is not None:
        meta["input_shape"] = list(_first_sample_shape(example))
    qm.lowbit_meta = meta
    if example is not None:
        _check_runs(qm, example, m.name)
        qm.lowbit_example = _small(example)
    return qm


def _small(example: Batch) -> Batch:
    """One sample of the example input, kept on the model for later graph capture (lowbit.save)."""
    xs = tuple(t[:1].clone() if t.dim() else t.clone() for t in as_inputs(example))
    return xs[0] if len(xs) == 1 else xs


def _check_quantized(gm: nn.Module, method: str, config: QuantConfig, layers: list[str]) -> None:
    from lowbit.nn import LowbitModule

    if config.allow_float or any(isinstance(mod, LowbitModule) and hasattr(mod, "packed") for mod in gm.modules()):
        return
    raise NoQuantizableLayerError(
        f"{method} quantized no layer of the model (layers: {', '.join(layers) or 'none'}); pass allow_float=True "
        "to get the float model back")


def _first_sample(batch: Batch) -> Batch:
    xs = tuple(t[:1] for t in as_inputs(batch))
    return xs[0] if len(xs) == 1 else xs


def _warn_unmatched(config: QuantConfig, layers: list[str]) -> None:
    for option, pattern in config.patterns():
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            shown = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
            warnings.warn(f"{option} pattern {pattern!r} matches no layer of the model (layers: {shown})",
                          UserWarning, stacklevel=3)


def _check_runs(gm: nn.Module, example: Batch, method: str) -> None:
    """Run the quantized model once on the example input, so a model that cannot run is an error here,
    not a file that fails later."""
    from lowbit.evaluate import model_input

    xs = as_inputs(example)
    try:
        with torch.no_grad():
            gm(*model_input(gm, xs if len(xs) > 1 else xs[0], as_tuple=True))
    except Exception as e:
        raise RuntimeError(f"the {method} model does not run on the example input: {type(e).__name__}: {e}") from e
