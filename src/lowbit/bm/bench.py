"""BM rows of ``lowbit bench kernels``: the integer BM layer on the benchmark's GEMM / conv shapes.

Same shapes as the int8 rows: GEMM ``(M, N, K)`` is a BM linear layer (M inputs of K features, N
outputs), a conv case a 3x3 BM convolution, padding 1. Input uint8 codes with zero point 0 (the layer
follows a ReLU), so each output takes two max-plus products of K terms (against the + and - weight
codes) and the exp-table epilogue: ``4*M*N*K`` integer operations (an add and a max per term), where
the int8 GEMM does ``2*M*N*K`` (a multiply and an add). The benchmark's GOP/s column counts ``2*M*N*K``
for every row, so the ratio of two rows is the ratio of their times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lowbit.kernels.bm import BMEpilogue, bm_conv2d, bm_linear, log_table, min_code, pack_bm

__all__ = ["bm_kernel_fn"]

_F = {8: 4, 16: 8}


def bm_kernel_fn(case: Any, bits: int, g: torch.Generator) -> Callable[[], Any]:
    """A call of the integer BM layer of ``bits``-bit codes on ``case`` (its own operands)."""
    mn, f = min_code(bits), _F[bits]
    if case.kind == "gemm":
        x = torch.randint(0, 256, (case.M, case.K), generator=g, dtype=torch.uint8)
        shape: tuple[int, ...] = (case.N, case.K)
    else:
        x = torch.randint(0, 256, (1, case.C, case.H, case.H), generator=g, dtype=torch.uint8)
        shape = (case.C, case.C, 3, 3)
    cp = torch.randint(mn, 1, shape, generator=g, dtype=torch.int16)
    cn = torch.randint(mn, 1, shape, generator=g, dtype=torch.int16)
    w, L = pack_bm(cp, cn, bits), log_table(f, bits)
    T = torch.randint(1 << 28, 1 << 30, (1 << f,), generator=g, dtype=torch.int32)
    bias = torch.randint(-(1 << 20), 1 << 20, (shape[0],), generator=g, dtype=torch.int32)
    epi = BMEpilogue(T, f, 9, 8, bias, 0, 0, 255)
    if case.kind == "gemm":
        return lambda: bm_linear(x, 0, w, L, epi)
    return lambda: bm_conv2d(x, 0, w, L, epi, 1, 1)
