"""One protocol for packed weights, whatever kernel family runs them (int8, 4.6-bit, binary).

A packed-weight object holds a layer's integer weight codes prepared once for its kernels and answers:

* ``codes`` (the integer codes, original shape: ``[N, K]`` linear, ``[N, C/g, kh, kw]`` conv) and
  ``format`` (their :class:`~lowbit.formats.levels.Format`); ``out_features``, ``in_features``;
* ``linear(x, x_zp, bias, epi)`` and ``conv2d(x, x_zp, bias, epi, stride, padding, dilation, groups)``:
  the layer's integer product with the activation codes ``x`` (zero point ``x_zp``), bias and epilogue;
* ``storage()`` -> ``(attrs, tensors)``: how the weights are written to a model file (codes of fewer than
  8 bits bit-packed, see :mod:`lowbit.formats.packing`), and :func:`weights_from_storage` to read them;
* pickling and ``copy.deepcopy`` by repacking from the codes (native handles are never copied).

:func:`pack_weights` picks a kernel family for a format; a layer built on this protocol runs on any of
them. Registered families: ``int8`` (:class:`~lowbit.kernels.PackedInt8`), ``w46``
(:class:`~lowbit.kernels.w46.PackedW46`), ``binary`` (:class:`~lowbit.kernels.binary.PackedBinary`).
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch

from lowbit.formats.levels import Format
from lowbit.formats.packing import pack_codes, pack_codes_radix, storage_scheme, unpack_codes, unpack_codes_radix

__all__ = [
    "PackedWeights", "PACKINGS", "codes_storage", "decode_storage", "family", "pack_weights", "weights_from_storage"
]

#: kernel family name -> packed-weight class.
PACKINGS: dict[str, type[PackedWeights]] = {}
_FAMILY_MODULES = ("lowbit.kernels", "lowbit.kernels.w46", "lowbit.kernels.binary")


class PackedWeights:
    """Mixin defining the protocol; the concrete classes supply ``codes``, ``format`` and the products."""

    kernel: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.kernel:
            PACKINGS[cls.kernel] = cls

    # --- what the concrete classes define -----------------------------------------------------
    @property
    def codes(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def format(self) -> Format:
        raise NotImplementedError

    @classmethod
    def accepts(cls, fmt: Format) -> bool:
        """Whether this kernel family can run weights of ``fmt``."""
        raise NotImplementedError

    @classmethod
    def from_codes(cls, codes: torch.Tensor, fmt: Format, **extra: Any) -> PackedWeights:
        raise NotImplementedError

    def extra_attrs(self) -> dict[str, Any]:
        """Family-specific attributes needed to rebuild (e.g. the 4.6-bit activation bound K_x)."""
        return {}

    def linear(self, x: torch.Tensor, x_zp: int | None, bias: torch.Tensor | None = None,
               epi: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def conv2d(self, x: torch.Tensor, x_zp: int | None, bias: torch.Tensor | None = None, epi: Any = None,
               stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
               dilation: tuple[int, int] = (1, 1), groups: int = 1) -> torch.Tensor:
        raise NotImplementedError

    # --- shared behaviour --------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes[0].numel())

    #: int64 [N]: the largest ``|acc[n] - bias[n]|`` any activation codes can produce (set by the families
    #: that accumulate in int32; refused at packing when it exceeds 2^31 - 1, see lowbit.kernels.reference).
    acc_bound: torch.Tensor | None = None

    def check_bias(self, bias: torch.Tensor | None) -> None:
        """Raise :class:`~lowbit.kernels.AccumulatorOverflowError` unless ``acc_bound[n] + |bias[n]|`` fits
        int32 for every channel (then no input can overflow the accumulator). Cached per bias tensor."""
        if bias is None or self.acc_bound is None:
            return
        key = (id(bias), bias._version)
        if getattr(self, "_bias_checked", None) == key:
            return
        worst = self.acc_bound + bias.to(torch.int64).reshape(-1).abs()
        if worst.numel() and int(worst.max()) > 2**31 - 1:
            from .reference import AccumulatorOverflowError

            n = int(worst.argmax())
            raise AccumulatorOverflowError(
                f"output channel {n}: the worst-case accumulator plus |bias| ({int(worst[n])}) exceeds 2^31 - 1; "
                "split the layer along K or lower the bias scale"
            )
        self._bias_checked = key

    def storage(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(attrs, tensors)`` for a model file: 8-bit codes as they are (tensor ``q``), narrower codes
        bit-packed (tensor ``packed``, :func:`~lowbit.formats.packing.pack_codes`) or, where that takes fewer
        bits (level counts that are not powers of two, e.g. 21 levels: 4.57 bits instead of 5), in radix
        words (tensor ``radix``, :func:`~lowbit.formats.packing.pack_codes_radix`)."""
        return codes_storage(self.kernel, self.codes, self.format, self.extra_attrs())

    def __reduce__(self) -> tuple[Any, ...]:
        return (_repack, (self.kernel, self.codes.detach().clone(), self.format, self.extra_attrs()))


def codes_storage(kernel: str, codes: torch.Tensor, fmt: Format, extra: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """:meth:`PackedWeights.storage` of ``codes`` (of any shape) without packing them for a kernel."""
    attrs = {"kernel": kernel, "format": fmt.to_dict(), "shape": list(codes.shape), **extra}
    scheme = storage_scheme(fmt)
    if scheme == "q":
        return attrs, {"q": codes.to(torch.int8).contiguous()}
    if scheme == "radix":
        return attrs, {"radix": pack_codes_radix(codes, fmt)}
    return attrs, {"packed": pack_codes(codes, fmt)}


def _repack(kernel: str, codes: torch.Tensor, fmt: Format, extra: dict[str, Any]) -> PackedWeights:
    return family(kernel).from_codes(codes, fmt, **extra)


def family(kernel: str) -> type[PackedWeights]:
    if kernel not in PACKINGS:
        for mod in _FAMILY_MODULES:
            importlib.import_module(mod)
    if kernel not in PACKINGS:
        raise ValueError(f"unknown weight kernel family {kernel!r}; known: {', '.join(sorted(PACKINGS))}")
    return PACKINGS[kernel]


def pack_weights(codes: torch.Tensor, fmt: Format, kernel: str | None = None, **extra: Any) -> PackedWeights:
    """Pack integer weight ``codes`` of format ``fmt`` for ``kernel`` (a family name), or for the first
    family that accepts the format (binary formats: ``binary``; anything within int8: ``int8``)."""
    if kernel is not None:
        cls = family(kernel)
        if not cls.accepts(fmt):
            raise ValueError(f"the {kernel} kernels cannot run weights of {fmt}")
        return cls.from_codes(codes, fmt, **extra)
    for name in ("binary", "int8"):
        cls = family(name)
        if cls.accepts(fmt):
            return cls.from_codes(codes, fmt, **extra)
    raise ValueError(f"no integer kernel runs weights of {fmt} (levels must fit in int8, or be ±1)")


def decode_storage(attrs: dict[str, Any], tensors: dict[str, torch.Tensor]
                   ) -> tuple[str, torch.Tensor, Format, dict[str, Any]]:
    """``(kernel, codes, format, extra attributes)`` of :meth:`PackedWeights.storage` output, unpacked but
    not yet packed for a kernel; ValueError on anything inconsistent."""
    from lowbit.formats.levels import format_from_dict

    try:
        kernel = str(attrs["kernel"])
        family(kernel)
        fmt = format_from_dict(attrs["format"])
        shape = tuple(int(s) for s in attrs["shape"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"incomplete weight storage description: {e}") from None
    if "q" in tensors:
        codes = tensors["q"]
        if tuple(codes.shape) != shape:
            raise ValueError(f"stored weight codes have shape {tuple(codes.shape)}, expected {shape}")
    elif "packed" in tensors:
        codes = unpack_codes(tensors["packed"], fmt, shape)
    elif "radix" in tensors:
        codes = unpack_codes_radix(tensors["radix"], fmt, shape)
    else:
        raise ValueError("weight storage holds none of 'q', 'packed' or 'radix' codes")
    extra = {k: v for k, v in attrs.items() if k not in ("kernel", "format", "shape")}
    return kernel, codes, fmt, extra


def weights_from_storage(attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PackedWeights:
    """Rebuild packed weights from :meth:`PackedWeights.storage` output."""
    kernel, codes, fmt, extra = decode_storage(attrs, tensors)
    return family(kernel).from_codes(codes, fmt, **extra)
