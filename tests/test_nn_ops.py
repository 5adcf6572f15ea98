"""Integer ops on codes and the PyTorch kernel backend against the independent specification (tests/_spec.py),
bit for bit."""

import numpy as np
import pytest
import torch

import _spec as S
from _spec_modules import spec_epilogue
from lowbit import kernels
from lowbit.formats import UINT8_ACT, choose_qparams, quantize, quantize_multiplier
from lowbit.formats.affine import add_multipliers
from lowbit.formats.granularity import PerTensor
from lowbit.kernels import torch_backend
from lowbit.kernels.reference import add_ref
from lowbit.methods.base import LayerSettings
from lowbit.methods.common import quantize_weight
from lowbit.nn import QAdd, QAvgPool2d, QClamp


def _q(x):
    s, z = choose_qparams(x.min(), x.max(), UINT8_ACT)
    return quantize(x, s, z, UINT8_ACT), (float(s), int(z))


# ------------------------------------------------------------------------------------------ residual add


def test_add_multipliers_match_spec():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        sa, sb, so = (10 ** (torch.rand(3, generator=g).double() * 6 - 3)).tolist()
        try:
            want = S.add_multipliers(sa, sb, so)
        except AssertionError:  # multiplier outside the representable range
            continue
        if min(want[:2]) < 1:
            with pytest.raises(ValueError, match="2\\^31"):
                add_multipliers(sa, sb, so)
            continue
        assert add_multipliers(sa, sb, so) == want
        ma, mb, r = want
        assert max(ma, mb) < 2**31 and max(ma, mb) >= 2**30
    with pytest.raises(ValueError, match="2\\^31"):
        add_multipliers(1.0, 1e-12, 1.0)  # the second input would vanish


def test_qadd_rounds_once_half_up():
    """Every sum and every tie: exact against the spec, and ties go up (floor or half-to-even would not)."""
    a = torch.arange(256, dtype=torch.uint8).repeat_interleave(256)
    b = torch.arange(256, dtype=torch.uint8).repeat(256)
    for scales, zps in [((0.05, 0.02, 0.06), (10, 128, 3)), ((0.5, 0.5, 1.0), (0, 0, 0)),
                        ((1.0, 0.25, 2.0), (7, 200, 100)), ((0.013, 0.0371, 0.0402), (255, 0, 17))]:
        want = S.add(a.numpy(), zps[0], b.numpy(), zps[1], scales, zps[2])
        got = QAdd((scales[0], zps[0]), (scales[1], zps[1]), (scales[2], zps[2]))(a, b)
        assert got.dtype == torch.uint8 and np.array_equal(got.numpy().astype(np.int64), want), scales
    # halves: (a + b) / 2 with scales 0.5, 0.5 -> 1 has a tie whenever a + b is odd; half up
    out = QAdd((0.5, 0), (0.5, 0), (1.0, 0))(torch.tensor([1, 3, 0], dtype=torch.uint8),
                                             torch.tensor([0, 0, 254], dtype=torch.uint8))
    assert out.tolist() == [1, 2, 127]


def test_qadd_fused_relu_broadcast_and_spec_roundtrip():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (2, 4, 5, 5), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (1, 4, 1, 5), dtype=torch.uint8, generator=g)
    q = QAdd((0.03, 100), (0.07, 30), (0.09, 140), act="relu")
    want = S.add(a.numpy(), 100, b.numpy(), 30, (0.03, 0.07, 0.09), 140, lo=140)
    y = q(a, b)
    assert np.array_equal(y.numpy().astype(np.int64), want) and int(y.min()) >= 140
    attrs, tensors = q.to_spec()
    assert set(attrs) >= {"a", "b", "out", "act"} and "m_a" not in attrs  # scales stored, multipliers derived
    r = QAdd.from_spec(attrs, tensors)
    assert (r.m_a, r.m_b, r.rshift, r.lo, r.hi) == (q.m_a, q.m_b, q.rshift, q.lo, q.hi)
    assert torch.equal(r(a, b), y)
    old = QAdd.from_spec({"a": [0.03, 100], "b": [0.07, 30], "out": [0.09, 140]}, {})  # files without "act"
    assert old.act is None and old.lo == 0


def test_qadd_kernel_interface():
    a = torch.tensor([0, 255, 128], dtype=torch.uint8)
    b = torch.tensor([255, 0, 128], dtype=torch.uint8)
    ma, mb, r = add_multipliers(0.05, 0.02, 0.06)
    y = kernels.qadd(a, 10, b, 128, ma, mb, r, 3, 0, 255)
    assert np.array_equal(y.numpy().astype(np.int64), S.add(a.numpy(), 10, b.numpy(), 128, (0.05, 0.02, 0.06), 3))
    assert torch.equal(y, add_ref(a, 10, b, 128, ma, mb, r, 3))
    with pytest.raises(TypeError):
        add_ref(a.to(torch.int16), 0, b, 0, ma, mb, r, 0)
    with pytest.raises(ValueError):
        add_ref(a, 0, b, 0, ma, mb, 63, 0)


# ------------------------------------------------------------------------------------- pooling, clamp


def test_qavgpool_global_and_windowed():
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 3, 7, 6), dtype=torch.uint8)
    xn = x.numpy()
    assert np.array_equal(QAvgPool2d(0, output_size=1)(x).numpy(), S.adaptive_avg_pool(xn, 1))
    assert np.array_equal(QAvgPool2d(9, kernel_size=2, stride=2)(x).numpy(), S.avg_pool(xn, 2, 2, 0, 9))
    assert np.array_equal(QAvgPool2d(9, kernel_size=3, stride=2, padding=1)(x).numpy(), S.avg_pool(xn, 3, 2, 1, 9))
    assert np.array_equal(QAvgPool2d(0, output_size=(3, 2))(x).numpy(), S.adaptive_avg_pool(xn, (3, 2)))
    ties = torch.tensor([[[[1, 2], [3, 4]]]], dtype=torch.uint8)  # mean 2.5 -> 3 (half up)
    assert QAvgPool2d(0, output_size=1)(ties).item() == 3


def test_qclamp():
    x = torch.arange(0, 256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(QClamp(10, 200)(x), torch.from_numpy(np.clip(np.arange(256), 10, 200).astype(np.uint8)))


# ---------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (5, 17)])
def test_quantize_weight_per_channel(shape):
    """Per output channel: s_n = max|w_n| / 127, codes round_half_even(w / s_n); per tensor only on request."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    q, s = quantize_weight(w, LayerSettings())
    w2 = w.reshape(shape[0], -1).numpy()
    want_s = np.array([S.qparams(r.min(), r.max(), -127, 127, symmetric=True, signed=True)[0] for r in w2])
    assert np.array_equal(s.numpy(), want_s)
    codes = S.quantize(w2, want_s[:, None], 0, -127, 127)
    assert np.array_equal(q.reshape(shape[0], -1).numpy().astype(np.int64), codes)
    qt, st = quantize_weight(w, LayerSettings(weight_granularity=PerTensor()))
    one = S.qparams(w2.min(), w2.max(), -127, 127, symmetric=True, signed=True)[0]
    assert np.array_equal(st.numpy(), np.full(shape[0], one, np.float32))


# ------------------------------------------------------------------------------------ dynamic qparams


def test_choose_qparams_one_rule_for_scalars_and_tensors():
    """Dynamic layers call choose_qparams with Python floats (a path without tensor ops): same float64 rule,
    same results as tensors and as the spec, ties included."""
    g = torch.Generator().manual_seed(3)
    lo = (torch.rand(2000, generator=g) * -8).to(torch.float32)
    hi = (torch.rand(2000, generator=g) * 8).to(torch.float32)
    k = torch.arange(200, dtype=torch.float32)  # scale 1/16 exactly and -lo / scale = k + 1/2: a tie
    lo[:200], hi[:200] = -(k + 0.5) / 16, (254.5 - k) / 16
    lo[200:210], hi[200:210] = 0.0, 0.0
    st, zt = choose_qparams(lo, hi, UINT8_ACT)
    for i in range(len(lo)):
        s1, z1 = choose_qparams(float(lo[i]), float(hi[i]), UINT8_ACT)
        want = S.qparams(float(lo[i]), float(hi[i]), 0, 255)
        assert (s1.dtype, z1.dtype) == (torch.float32, torch.int32)
        assert (np.float32(s1.item()), int(z1)) == want == (np.float32(st[i].item()), int(zt[i])), i
        if i < 200:  # half to even, not half up
            assert (float(s1), int(z1)) == (1 / 16, int(k[i]) + int(k[i]) % 2), i
    with pytest.raises(ValueError, match="NaN"):
        choose_qparams(float("nan"), 1.0, UINT8_ACT)


# -------------------------------------------------------------------------------- torch kernel backend


def _same(got: torch.Tensor, want: np.ndarray) -> bool:
    g = got.contiguous().numpy()
    return g.shape == want.shape and np.array_equal(g.astype(want.dtype) if want.dtype == np.int64 else g, want)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 63, 17), (5, 100, 33), (64, 576, 64)])
def test_torch_backend_gemm_exact(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randint(0, 256, (M, K), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    b = torch.randint(-(2**20), 2**20, (N,), dtype=torch.int32, generator=g)
    m0, sh = quantize_multiplier(torch.rand(N, generator=g).double() * 1e-3 + 1e-5)
    p = kernels.pack_int8(w)
    for zp in (0, 77, 255):
        acc = S.linear_acc(x.numpy().astype(np.int64) - zp, w.numpy(), b.numpy())
        for epi in (None, kernels.Requant(m0, sh, 5, 5, 250), kernels.Requant(m0, sh, -3, -128, 127, torch.int8),
                    kernels.Requant(m0[:1], sh[:1], 9, 0, 255),
                    kernels.FloatOut(torch.rand(N, generator=g), torch.randn(N, generator=g))):
            got = torch_backend.int8_gemm(x, zp, p.w_t, p.colsum, b, epi)
            assert torch.equal(got, spec_epilogue(acc, epi, -1)), (zp, epi)


def test_torch_backend_extremes():
    x = torch.full((3, 4096), 255, dtype=torch.uint8)
    w = torch.full((2, 4096), -128, dtype=torch.int8)
    p = kernels.pack_int8(w)
    assert torch_backend.int8_gemm(x, 0, p.w_t, p.colsum, None, None).unique().tolist() == [-255 * 128 * 4096]


@pytest.mark.parametrize("groups,C,N,stride,pad,dil", [(1, 3, 8, 1, 1, 1), (2, 4, 6, 2, 0, 1), (8, 8, 8, 1, 1, 2),
                                                       (1, 16, 4, 2, 2, 1)])
def test_torch_backend_conv_exact(groups, C, N, stride, pad, dil):
    g = torch.Generator().manual_seed(C * N)
    x = torch.randint(0, 256, (2, C, 9, 7), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (N, C // groups, 3, 3), dtype=torch.int8, generator=g)
    p = kernels.pack_int8(w)
    args = ((stride, stride), (pad, pad), (dil, dil), groups)
    got = torch_backend.int8_conv2d(x, 13, w, p.w_t, p.colsum, None, None, *args)
    want = S.conv_acc(x.numpy().astype(np.int64) - 13, w.numpy(), None, *args)
    assert _same(got, want)


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
