"""The observer interface: see float tensors, choose a clipping range, then quantization parameters.

An observer is fed float tensors with :meth:`Observer.observe` (activations over a calibration set,
batch after batch, or a weight tensor once) and answers :meth:`Observer.range` — the real interval
``[lo, hi]`` that the quantization grid should cover for a given :class:`~lowbit.formats.QFormat` —
and :meth:`Observer.qparams`, the scale and zero point that
:func:`~lowbit.formats.choose_qparams` derives from that range.

``axis=None`` observes per tensor (activations): ``range`` returns 0-dim tensors.
``axis=k`` observes per channel along dimension ``k`` (weights, usually ``axis=0``, the output
channel): ``range`` returns vectors with one entry per channel, to be used with
``quantize(..., axis=k)``.
"""

from __future__ import annotations

import torch

from ..formats.affine import QFormat, choose_qparams
from ..formats.levels import Format

__all__ = ["Observer"]


class Observer:
    """Base class: accumulates min/max and the count of tensors seen; subclasses choose the range.

    Subclasses implement ``_observe(flat)`` (optional; ``flat`` is the observed tensor as float32,
    1-D per tensor or ``(C, N)`` per channel, already checked to be finite) and
    ``_range(fmt) -> (lo, hi)``.

    Attributes:
        axis: None (per tensor) or the channel dimension.
        observed: number of tensors accepted by :meth:`observe`.
        numel: number of elements accepted by :meth:`observe`.
        min_val, max_val: running minimum and maximum (float64; scalars or per-channel vectors),
            None before the first observation.
    """

    def __init__(self, axis: int | None = None) -> None:
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be None (per tensor) or an int (per channel), got {axis!r}")
        self.axis = axis
        self.observed = 0
        self.numel = 0
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self._channels: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def __repr__(self) -> str:
        where = "per tensor" if self.axis is None else f"per channel (axis={self.axis})"
        return f"{type(self).__name__}({where}, observed={self.observed})"

    # --- accumulation -------------------------------------------------------------------------

    def observe(self, x: torch.Tensor) -> None:
        """Accumulate statistics of ``x``. May be called any number of times.

        Raises ValueError on an empty tensor, on NaN/Inf values, or (per channel) on a tensor
        whose channel count differs from the earlier ones.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.observe expects a torch.Tensor, got {type(x).__name__}")
        if x.is_complex():
            raise TypeError(f"{type(self).__name__}.observe: complex tensors cannot be quantized")
        x = x.detach()
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__}.observe: got an empty tensor")
        x = x.to(torch.float32)  # (float64 beyond the float32 range becomes Inf and is rejected)
        if not bool(torch.isfinite(x).all()):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int(torch.isinf(x).sum())
            raise ValueError(
                f"{type(self).__name__}.observe: input contains {n_nan} NaN and {n_inf} Inf values "
                f"(of {x.numel()}); quantization ranges need finite data — check the model and "
                "the calibration inputs"
            )
        flat = self._flatten(x)
        if flat.dim() == 1:
            mn, mx = torch.aminmax(flat)
        else:
            mn, mx = torch.aminmax(flat, dim=1)
        mn, mx = mn.to(torch.float64), mx.to(torch.float64)
        self.min_val = mn if self.min_val is None else torch.minimum(self.min_val, mn)
        self.max_val = mx if self.max_val is None else torch.maximum(self.max_val, mx)
        self._observe(flat)
        self.observed += 1
        self.numel += x.numel()

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return x.reshape(-1)
        if x.dim() == 0:
            raise ValueError(f"{type(self).__name__}: per-channel observer (axis={self.axis}) got a scalar")
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(
                f"{type(self).__name__}: axis {self.axis} is out of range for a tensor of shape {tuple(x.shape)}"
            )
        c = x.shape[self.axis]
        if self._channels is not None and c != self._channels:
            raise ValueError(
                f"{type(self).__name__}: got {c} channels along axis {self.axis}, earlier tensors had {self._channels}"
            )
        self._channels = c
        return x.movedim(self.axis, 0).reshape(c, -1)

    def _observe(self, flat: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Subclass hook: accumulate whatever the range choice needs."""

    # --- results ------------------------------------------------------------------------------

    def range(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip range ``(lo, hi)`` for ``fmt`` as float32 tensors (0-dim, or one per channel)."""
        if self.observed == 0:
            raise ValueError(
                f"observer has seen no data: call {type(self).__name__}.observe() on calibration data "
                "before range() or qparams()"
            )
        if not isinstance(fmt, Format):
            raise TypeError(f"fmt must be a lowbit Format (e.g. a QFormat), got {type(fmt).__name__}")
        lo, hi = self._range(fmt)
        lo = lo.to(torch.float64)
        hi = torch.maximum(hi.to(torch.float64), lo)
        return lo.to(torch.float32), hi.to(torch.float32)

    def _range(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        """``choose_qparams(*self.range(fmt), fmt)``: (scale float32, zero_point int32)."""
        return choose_qparams(*self.range(fmt), fmt)

    # --- helpers for subclasses -----------------------------------------------------------------

    def _minmax(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val, self.max_val


class _KeepsChannelData:
    """Mixin for per-channel observers that compute exactly on the observed tensor(s).

    Per channel, these observers keep every observed value (concatenated along the non-channel
    dimension): they are meant for weights, observed once. Per tensor they use bounded summaries.
    """

    _chunks: list[torch.Tensor]

    def _keep(self, flat: torch.Tensor) -> None:
        if not hasattr(self, "_chunks"):
            self._chunks = []
        self._chunks.append(flat.detach().clone())  # a copy: the caller may modify its tensor later

    def _data(self) -> torch.Tensor:
        chunks = self._chunks
        if len(chunks) > 1:
            self._chunks = [torch.cat(chunks, dim=1)]
        return self._chunks[0]
