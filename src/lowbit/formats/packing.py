"""Sub-byte storage of codes: ``N`` levels take ``ceil(log2 N)`` bits each in a file, or fewer.

Each code is stored as its index in the format's levels (``code - qmin`` for uniform formats).

* **bit stream** (:func:`pack_codes`): ``b = format.bits`` bits per index, one little-endian bit stream:
  code ``j`` occupies bits ``j*b .. j*b+b-1`` (bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``).
  A 4-bit weight tensor takes half the bytes of int8 storage, a 2-bit one a quarter.
* **radix words** (:func:`pack_codes_radix`): ``g`` indices per 32-bit word, as the base-``N`` number
  ``sum_i idx[j*g + i] * N^i`` (``g``: the most with ``N^g <= 2^32``), each word 4 little-endian bytes.
  When ``N`` is not a power of two this takes ``32 / g`` bits per code instead of ``ceil(log2 N)``: the
  19-, 21- and 23-level weights of 4.6-bit quantization pack 7 to a word, 4.57 bits each instead of 5
  (the information content is 4.25-4.52 bits; no entropy coding, so every code decodes on its own word
  and a corrupt word is detected). :func:`storage_scheme` picks the smaller of the two.
"""

from __future__ import annotations

import torch

from .levels import Format

__all__ = ["pack_codes", "unpack_codes", "packed_nbytes", "pack_codes_radix", "unpack_codes_radix", "radix_group",
           "storage_scheme", "storage_bits"]


def packed_nbytes(numel: int, fmt: Format) -> int:
    return (int(numel) * fmt.bits + 7) // 8


def _indices(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    c = codes.detach().reshape(-1).to(torch.int64)
    if fmt.uniform:
        if c.numel() and (int(c.min()) < fmt.qmin or int(c.max()) > fmt.qmax):
            raise ValueError(f"codes outside [{fmt.qmin}, {fmt.qmax}] of {fmt}")
        return c - fmt.qmin
    return fmt.index(c)


def pack_codes(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes (any integer dtype and shape) -> uint8 bytes of their ``fmt.bits``-bit indices (1-D)."""
    idx = _indices(codes, fmt)
    b = fmt.bits
    if b == 8:
        return idx.to(torch.uint8)
    shifts = torch.arange(b, dtype=torch.int64)
    bits = ((idx[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, torch.zeros(pad, dtype=torch.uint8)])
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int32)
    return (bits.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_codes(data: torch.Tensor, fmt: Format, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes of ``shape``. Raises ValueError on a size mismatch or an
    index that names no level (a corrupt file)."""
    n = 1
    for s in shape:
        n *= int(s)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
    if data.numel() != packed_nbytes(n, fmt):
        raise ValueError(f"{data.numel()} bytes of packed codes for {n} codes of {fmt.bits} bits "
                         f"(expected {packed_nbytes(n, fmt)})")
    b = fmt.bits
    if b == 8:
        idx = data.to(torch.int64)
    else:
        bits = ((data.to(torch.int64)[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: n * b]
        idx = (bits.reshape(n, b) << torch.arange(b, dtype=torch.int64)).sum(1)
    if idx.numel() and int(idx.max()) >= fmt.n_levels:
        raise ValueError(f"packed code index {int(idx.max())} names no level of {fmt}")
    codes = idx + fmt.qmin if fmt.uniform else fmt.from_index(idx)
    return codes.reshape(tuple(int(s) for s in shape))


# ------------------------------------------------------------------------------------ radix words

_WORD = 1 << 32


def radix_group(fmt: Format) -> int:
    """Codes of ``fmt`` per 32-bit radix word: the largest ``g`` with ``N^g <= 2^32`` (N = number of levels)."""
    n, g = fmt.n_levels, 0
    while n ** (g + 1) <= _WORD:
        g += 1
    return max(g, 1) if n <= _WORD else 0


def storage_scheme(fmt: Format) -> str:
    """How codes of ``fmt`` are stored: ``"q"`` (int8 as is: 8-bit formats), ``"radix"`` (radix words, when
    fewer bits per code than the bit stream) or ``"packed"`` (the bit stream)."""
    if fmt.bits >= 8 and fmt.dtype == torch.int8:
        return "q"
    g = radix_group(fmt)
    return "radix" if g and 32 / g < fmt.bits else "packed"


def storage_bits(fmt: Format) -> float:
    """Bits one code of ``fmt`` takes in storage (before the padding of the last byte or word)."""
    scheme = storage_scheme(fmt)
    return 32 / radix_group(fmt) if scheme == "radix" else float(8 if scheme == "q" else fmt.bits)


def pack_codes_radix(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes (any integer dtype and shape) -> uint8 bytes of radix words (1-D, 4 bytes per word)."""
    g = radix_group(fmt)
    if not g:
        raise ValueError(f"{fmt} has too many levels for 32-bit radix words")
    idx = _indices(codes, fmt)
    pad = (-idx.numel()) % g
    if pad:
        idx = torch.cat([idx, torch.zeros(pad, dtype=torch.int64)])
    powers = fmt.n_levels ** torch.arange(g, dtype=torch.int64)
    words = (idx.reshape(-1, g) * powers).sum(1)
    return ((words[:, None] >> torch.tensor([0, 8, 16, 24])) & 255).to(torch.uint8).reshape(-1)


def unpack_codes_radix(data: torch.Tensor, fmt: Format, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_codes_radix`: int64 codes of ``shape``. Raises ValueError on a size mismatch or
    a word that is not a valid base-N number of ``g`` digits (a corrupt file)."""
    n = 1
    for s in shape:
        n *= int(s)
    g = radix_group(fmt)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
    nwords = (n + g - 1) // g if g else -1
    if data.numel() != 4 * nwords:
        raise ValueError(f"{data.numel()} bytes of radix-packed codes for {n} codes, {g} per 32-bit word "
                         f"(expected {4 * nwords})")
    words = (data.to(torch.int64).reshape(-1, 4) << torch.tensor([0, 8, 16, 24])).sum(1)
    N = fmt.n_levels
    if words.numel() and int(words.max()) >= N**g:
        raise ValueError(f"radix word {int(words.max())} is not {g} codes of {N} levels ({fmt})")
    idx = (words[:, None] // (N ** torch.arange(g, dtype=torch.int64))) % N
    idx = idx.reshape(-1)[:n]
    codes = idx + fmt.qmin if fmt.uniform else fmt.from_index(idx)
    return codes.reshape(tuple(int(s) for s in shape))
