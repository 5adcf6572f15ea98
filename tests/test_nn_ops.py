"""Integer ops on codes against float references, and the PyTorch kernel backend against the spec."""

import pytest
import torch
import torch.nn.functional as F

from lowbit import kernels
from lowbit.formats import UINT8_ACT, choose_qparams, dequantize, quantize, quantize_multiplier
from lowbit.kernels import torch_backend
from lowbit.kernels.reference import int8_conv2d_ref, int8_gemm_ref
from lowbit.nn import QAdd, QAvgPool2d, QClamp


def _q(x):
    s, z = choose_qparams(x.min(), x.max(), UINT8_ACT)
    return quantize(x, s, z, UINT8_ACT), (float(s), int(z))


def test_qadd_matches_float_within_one_code():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8, 5, 5) * 2, torch.randn(4, 8, 5, 5)
    qa, pa = _q(a)
    qb, pb = _q(b)
    ref = dequantize(qa, *pa) + dequantize(qb, *pb)
    _, po = _q(ref)
    out = QAdd(pa, pb, po)(qa, qb)
    assert out.dtype == torch.uint8
    exact = torch.clamp(torch.round(ref / po[0]) + po[1], 0, 255)
    assert (out.to(torch.float32) - exact).abs().max() <= 1


def test_qavgpool_global_and_windowed():
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 3, 7, 6), dtype=torch.uint8)
    g = QAvgPool2d(0, output_size=1)(x)
    exact = torch.floor(x.double().mean((2, 3), keepdim=True) + 0.5)
    assert torch.equal(g.double(), exact)
    w = QAvgPool2d(9, kernel_size=2, stride=2)(x)
    ref = torch.floor(F.avg_pool2d(x.double(), 2, 2) + 0.5)
    assert torch.equal(w.double(), ref)
    a = QAvgPool2d(0, output_size=(3, 2))(x)
    ref = torch.floor(F.adaptive_avg_pool2d(x.double(), (3, 2)) + 0.5)
    assert torch.equal(a.double(), ref)


def test_qclamp():
    x = torch.arange(0, 256, dtype=torch.int32).to(torch.uint8)
    assert QClamp(10, 200)(x).min() == 10 and QClamp(10, 200)(x).max() == 200


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 63, 17), (5, 100, 33), (64, 576, 64)])
def test_torch_backend_gemm_exact(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randint(0, 256, (M, K), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    b = torch.randint(-(2**20), 2**20, (N,), dtype=torch.int32, generator=g)
    m0, sh = quantize_multiplier(torch.rand(N, generator=g).double() * 1e-3 + 1e-5)
    p = kernels.pack_int8(w)
    for zp in (0, 77, 255):
        for epi in (None, kernels.Requant(m0, sh, 5, 5, 250), kernels.Requant(m0, sh, -3, -128, 127, torch.int8),
                    kernels.FloatOut(torch.rand(N, generator=g), torch.randn(N, generator=g))):
            got = torch_backend.int8_gemm(x, zp, p.w_t, p.colsum, b, epi)
            assert torch.equal(got, int8_gemm_ref(x, zp, w, b, epi))


def test_torch_backend_extremes():
    x = torch.full((3, 4096), 255, dtype=torch.uint8)
    w = torch.full((2, 4096), -128, dtype=torch.int8)
    p = kernels.pack_int8(w)
    assert torch.equal(torch_backend.int8_gemm(x, 0, p.w_t, p.colsum, None, None), int8_gemm_ref(x, 0, w))


@pytest.mark.parametrize("groups,C,N,stride,pad,dil", [(1, 3, 8, 1, 1, 1), (2, 4, 6, 2, 0, 1), (8, 8, 8, 1, 1, 2),
                                                       (1, 16, 4, 2, 2, 1)])
def test_torch_backend_conv_exact(groups, C, N, stride, pad, dil):
    g = torch.Generator().manual_seed(C * N)
    x = torch.randint(0, 256, (2, C, 9, 7), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (N, C // groups, 3, 3), dtype=torch.int8, generator=g)
    p = kernels.pack_int8(w)
    args = ((stride, stride), (pad, pad), (dil, dil), groups)
    got = torch_backend.int8_conv2d(x, 13, w, p.w_t, p.colsum, None, None, *args)
    assert torch.equal(got, int8_conv2d_ref(x, 13, w, None, None, *args))


def test_kernel_interface_errors():
    p = kernels.pack_int8(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(TypeError, match="uint8"):
        kernels.int8_linear(torch.zeros(2, 8), 0, p)
    with pytest.raises(ValueError, match="features"):
        kernels.int8_linear(torch.zeros(2, 9, dtype=torch.uint8), 0, p)
    with pytest.raises(ValueError, match="zero point"):
        kernels.int8_linear(torch.zeros(2, 8, dtype=torch.uint8), 300, p)
    with pytest.raises(TypeError, match="int8"):
        kernels.pack_int8(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("cuda")
