"""``lowbit.quantize``: one call from a float model to a quantized one."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from lowbit.graph import prepare

from .base import METHODS, QuantConfig, calibration_batches, check_calibration, get_method


def available_methods() -> list[str]:
    return sorted(METHODS, key=lambda n: (METHODS[n].order, n))


def quantize(
    model: nn.Module,
    method: str,
    calib: Any = None,
    config: QuantConfig | dict[str, Any] | None = None,
    example_input: torch.Tensor | None = None,
    **options: Any,
) -> fx.GraphModule:
    """Quantize ``model`` by ``method`` (see :func:`available_methods`).

    calib: calibration data (tensor [N, ...], Dataset, DataLoader or iterable of batches); needed by
    methods that calibrate activation ranges. example_input: one input batch (defaults to the first
    calibration sample). Returns an ``nn.Module`` (a torch.fx GraphModule) whose ``lowbit_meta`` says
    its method, configuration, input/output formats and which layers stayed float.
    """
    cls = get_method(method)
    m = cls(config, **options)
    batches = calibration_batches(calib, m.config.calib_samples, m.config.calib_batch_size)
    if example_input is None:
        if not batches:
            raise ValueError("pass example_input (one input batch) or calibration data to trace the model")
        example_input = batches[0][:1]
    if cls.needs_calibration:
        check_calibration(batches, example_input, method)
    prepared = prepare(model, example_input)
    gm = m.convert(prepared, batches)
    meta = dict(getattr(gm, "lowbit_meta", {}))
    meta.update(method=method, config=m.config.to_dict(), unsupported=list(prepared.unsupported),
                input_shape=list(example_input.shape[1:]))
    gm.lowbit_meta = meta
    gm.eval()
    return gm
