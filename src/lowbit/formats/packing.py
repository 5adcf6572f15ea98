"""Sub-byte storage of codes: ``N`` levels take ``ceil(log2 N)`` bits each in a file.

Each code is stored as its index in the format's levels (``code - qmin`` for uniform formats), in
``b = format.bits`` bits, as one little-endian bit stream: code ``j`` occupies bits ``j*b .. j*b+b-1``
(bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``). A 4-bit weight tensor therefore takes half
the bytes of int8 storage, a 2-bit one a quarter.
"""

from __future__ import annotations

import torch

from .levels import Format

__all__ = ["pack_codes", "unpack_codes", "packed_nbytes"]


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
