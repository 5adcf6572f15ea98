"""``lowbit.quantize``: one call from a float model to a quantized one."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from lowbit.graph import prepare
from lowbit.graph.attrs import set_preserved

from .base import METHODS, QuantConfig, TrainingData, calibration_batches, check_calibration, get_method


def available_methods() -> list[str]:
    return sorted(METHODS, key=lambda n: (METHODS[n].order, n))


def quantize(
    model: nn.Module,
    method: str | QuantConfig,
    calib: Any = None,
    config: QuantConfig | dict[str, Any] | None = None,
    example_input: torch.Tensor | None = None,
    train: Any = None,
    test: Any = None,
    **options: Any,
) -> fx.GraphModule:
    """Quantize ``model`` by ``method``: a name (see :func:`available_methods`) or a config object, whose
    class names the method (``lowbit.quantize(model, StaticConfig(activation_observer="kl"), calib=x)``).

    calib: calibration data (tensor [N, ...], Dataset, DataLoader or iterable of batches); needed by
    methods that calibrate activation ranges. example_input: one input batch (defaults to the first
    calibration sample). train / test: labelled data (datasets of ``(x, y)``) for training-aware
    methods (``lsq``, ``lsq_plus``, ``apot``, ...), which fine-tune the model; ``test`` is only reported.
    Returns an ``nn.Module`` (a torch.fx GraphModule) whose ``lowbit_meta`` says its method,
    configuration, input/output formats and which layers stayed float.
    """
    if isinstance(method, QuantConfig):
        if config is not None:
            raise ValueError("pass the configuration either as the method (a config object) or as config=, not both")
        cls, config = get_method(method), method
    else:
        cls = get_method(method)
    m = cls(config, **options)
    batches = calibration_batches(calib, m.config.calib_samples, m.config.calib_batch_size)
    if example_input is None:
        if not batches:
            raise ValueError("pass example_input (one input batch) or calibration data to trace the model")
        example_input = batches[0][:1]
    if cls.needs_calibration:
        check_calibration(batches, example_input, cls.name)
    if cls.needs_training_data and train is None:
        raise ValueError(f"method {cls.name!r} trains the model: pass labelled training data as train=")
    prepared = prepare(model, example_input)
    if cls.needs_training_data:
        gm = m.convert(prepared, batches, data=TrainingData(train, test))
    else:
        gm = m.convert(prepared, batches)
    meta = dict(getattr(gm, "lowbit_meta", {}))
    meta.update(method=cls.name, config=m.config.to_dict(), unsupported=list(prepared.unsupported))
    set_preserved(gm, "lowbit_meta", meta)  # kept by copy.deepcopy and pickling
    gm.eval()
    return gm
