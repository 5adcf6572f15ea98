"""The native float32 -> uint8 quantization (csrc/quantize.cpp) against a plain-PyTorch formula: 0 codes of
difference (the spec is exact: the same float32 division, round half to even, zero point and clamp)."""

from __future__ import annotations

import pytest
import torch

from lowbit import kernels
from lowbit.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")

PATHS = ("portable", "avx2")


def expected(x: torch.Tensor, scale: torch.Tensor, zp: int, lo: int, hi: int) -> torch.Tensor:
    """Independent reference: float32 divide (per tensor or per row), round half to even, + zp, clamp."""
    rows = x.reshape(scale.numel(), -1) if scale.numel() > 1 else x.reshape(1, -1)
    q = rows / scale.to(torch.float32).reshape(-1, 1)
    q = torch.round(q) + zp
    return torch.clamp(q, lo, hi).to(torch.uint8).reshape(x.shape)


def hard_inputs(n: int, scale: float, seed: int) -> torch.Tensor:
    """Random values, exact ties (k + 0.5) * scale, values next to ties, zeros and huge magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 40 * scale
    k = torch.randint(-300, 300, (n,), generator=g).to(torch.float32)
    ties = (k + 0.5) * scale
    pick = torch.randint(0, 6, (n,), generator=g)
    x = torch.where(pick == 1, ties, x)
    x = torch.where(pick == 2, torch.nextafter(ties, torch.full_like(ties, 1e30)), x)
    x = torch.where(pick == 3, torch.nextafter(ties, torch.full_like(ties, -1e30)), x)
    x = torch.where(pick == 4, torch.zeros_like(x), x)
    return torch.where(pick == 5, torch.sign(x) * 1e30, x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 100, 4097, 100_003])
@pytest.mark.parametrize("zp,lo,hi", [(0, 0, 255), (128, 1, 255), (37, 0, 255), (3, 0, 15)])
def test_per_tensor_matches_formula(path: str, n: int, zp: int, lo: int, hi: int) -> None:
    scale = 0.0372
    x = hard_inputs(n, scale, n + zp)
    with native.isa(path) as active:
        assert active == path
        got = native.quantize_u8(x, scale, zp, lo, hi)
    assert torch.equal(got, expected(x, torch.tensor([scale]), zp, lo, hi))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
def test_per_row_matches_formula(path: str, threads: int) -> None:
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(37, 1, generator=g) * 0.1 + 1e-3
    x = torch.cat([hard_inputs(203, float(s), i) for i, s in enumerate(scale.flatten())]).reshape(37, 203)
    before = native.num_threads()
    native.set_num_threads(threads)
    try:
        with native.isa(path):
            got = native.quantize_u8(x, scale, 128, 1, 255)
    finally:
        native.set_num_threads(before)
    assert torch.equal(got, expected(x, scale, 128, 1, 255))


def test_public_function_equals_torch_path_and_dynamic_codes() -> None:
    x = hard_inputs(5000, 0.05, 3).reshape(50, 100)
    with_native = kernels.quantize_u8(x, 0.05, 10)
    kernels.set_backend("torch")
    try:
        with_torch = kernels.quantize_u8(x, 0.05, 10)
    finally:
        kernels.set_backend(None)
    assert torch.equal(with_native, with_torch)
    assert torch.equal(with_native, expected(x, torch.tensor([0.05]), 10, 0, 255))


def test_nan_gives_lo_and_other_dtypes_are_converted() -> None:
    x = torch.tensor([float("nan"), 1.0, -1.0], dtype=torch.float64)
    got = kernels.quantize_u8(x, 0.5, 100, 3, 250)
    assert got.tolist() == [3, 102, 98]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda c, p: c.quant_f32_u8(0, p, 1, 4, p, False, 0, 0, 255), "null pointer"),
        (lambda c, p: c.quant_f32_u8(p, p, 1, 4, p, False, 0, 9, 3), "clamp"),
        (lambda c, p: c.quant_f32_u8(p, p, -1, 4, p, False, 0, 0, 255), "negative size"),
        (lambda c, p: c.quant_f32_u8(p, p, 1, 4, p, False, 1 << 30, 0, 255), "zero point"),
    ],
)
def test_binding_checks_arguments(call, message: str) -> None:  # noqa: ANN001
    buf = torch.ones(16, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        call(native._require(), buf.data_ptr())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_binding_rejects_bad_scales(bad: float) -> None:
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        native.quantize_u8(torch.ones(4), bad, 0, 0, 255)
