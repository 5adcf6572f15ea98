"""Average pooling on uint8 activation codes (max pooling: ``lowbit.kernels.max_pool2d_codes``):
lowbit's native kernels when built, else the plain-PyTorch references
(the same integers either way; see :mod:`lowbit.kernels.reference`)."""

from __future__ import annotations

from typing import Any

import torch

from . import reference


def _native() -> Any:
    from . import _native_module, _use_native

    return _native_module() if _use_native() else None


def avg_pool2d(x: torch.Tensor, zero_point: int, kernel_size: Any, stride: Any = None,
               padding: Any = 0) -> torch.Tensor:
    """Average pooling of uint8 codes (zero-point padding counted, rounding half up)."""
    nat = _native()
    if nat is not None:
        return nat.avg_pool2d(x, zero_point, kernel_size, stride, padding)
    return reference.avg_pool2d_ref(x, zero_point, kernel_size, stride, padding)


def adaptive_avg_pool2d(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    """Adaptive average pooling of uint8 codes (window sums over window sizes, rounding half up)."""
    nat = _native()
    if nat is not None:
        return nat.adaptive_avg_pool2d(x, output_size)
    return reference.adaptive_avg_pool2d_ref(x, output_size)
