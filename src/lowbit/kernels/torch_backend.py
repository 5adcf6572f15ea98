"""Integer kernels on stock PyTorch ops (``torch._int_mm``): the fallback where lowbit._native is absent.

Same integers as ``reference.py`` (int8 operands, int32 accumulation, the same epilogue), only faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .epilogue import Epilogue
from .reference import apply_epilogue

name = "torch"


def _to_s8(x: torch.Tensor) -> torch.Tensor:
    """uint8 code -> int8 code - 128 (so the int8 x int8 product of torch._int_mm applies)."""
    return (x.to(torch.int16) - 128).to(torch.int8)


def gemm_s8(xs: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N]."""
    if xs.shape[0] == 0:
        return torch.zeros(0, wt.shape[1], dtype=torch.int32)
    return torch._int_mm(xs, wt)


def int8_gemm(
    x: torch.Tensor, x_zp: int, w_t: torch.Tensor, colsum: torch.Tensor, bias: torch.Tensor | None,
    epi: Epilogue | None,
) -> torch.Tensor:
    """x uint8 [M, K]; w_t int8 [K, N] (pre-transposed); colsum int32 [N] = sum_k w[n, k]."""
    acc = gemm_s8(_to_s8(x), w_t)
    corr = (128 - int(x_zp)) * colsum
    if bias is not None:
        corr = corr + bias
    acc += corr
    return apply_epilogue(acc, epi)


def int8_conv2d(
    x: torch.Tensor, x_zp: int, w: torch.Tensor, w_t: torch.Tensor, colsum: torch.Tensor,
    bias: torch.Tensor | None, epi: Epilogue | None, stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], groups: int,
) -> torch.Tensor:
    """x uint8 NCHW; w int8 [N, C/g, kh, kw]; w_t int8 [K, N] for groups == 1. Output NCHW."""
    B, C, H, W = x.shape
    N, Cg, kh, kw = w.shape
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=int(x_zp))
    Hp, Wp = x.shape[2], x.shape[3]
    Ho = (Hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (Wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    # im2col in float32 is exact for codes 0..255
    cols = F.unfold(x.to(torch.float32), (kh, kw), dilation=dilation, stride=stride)  # [B, C*kh*kw, L]
    L = cols.shape[-1]
    if groups == 1:
        a = cols.transpose(1, 2).reshape(B * L, C * kh * kw).to(torch.uint8)
        acc = gemm_s8(_to_s8(a), w_t)  # [B*L, N]
        corr = (128 - int(x_zp)) * colsum
        if bias is not None:
            corr = corr + bias
        acc += corr
        acc = acc.reshape(B, L, N).transpose(1, 2).reshape(B, N, Ho, Wo)
    else:
        # grouped / depthwise: exact int32 multiply-accumulate per group
        cols_i = cols.to(torch.int32).reshape(B, groups, Cg * kh * kw, L) - int(x_zp)
        wg = w.to(torch.int32).reshape(groups, N // groups, Cg * kh * kw)
        acc = torch.einsum("gnk,bgkl->bgnl", wg, cols_i) if N // groups > 1 else (
            (wg.reshape(1, groups, Cg * kh * kw, 1) * cols_i).sum(2, dtype=torch.int32).unsqueeze(2)
        )
        acc = acc.reshape(B, N, Ho, Wo).to(torch.int32)
        if bias is not None:
            acc += bias.reshape(1, -1, 1, 1)
    return apply_epilogue(acc.contiguous(), epi, channel_axis=1)
