"""4.6-bit kernels with an activation zero point other than K_x (codes from a calibrated min/max range).

``sum_k (a - zp) * w + bias`` with the padding holding ``zp`` must come out exactly on every dispatch path;
the expected values are computed here independently (explicit padding with ``zp``, float64 convolution).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.w46 import pack_w46, w46_conv2d, w46_linear

try:
    from lowbit import _native as nat

    HAVE_NATIVE = hasattr(nat, "w46_pack")
except ImportError:  # pragma: no cover - depends on the build
    nat = None
    HAVE_NATIVE = False

_ORDER = {"portable": 0, "neon": 1, "avx2": 2, "avx512bw": 3, "vnni": 4}


@pytest.fixture(params=["torch", "portable", "avx2", "avx512bw", "vnni"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    if request.param == "torch":
        monkeypatch.setenv("LOWBIT_KERNELS", "torch")
        yield "torch"
        return
    if not HAVE_NATIVE:
        pytest.skip("lowbit._native is not built")
    best = nat.best_isa()
    if request.param != "portable" and (best == "neon" or _ORDER[request.param] > _ORDER[best]):
        pytest.skip(f"this CPU cannot run the {request.param} path (best ISA here: {best})")
    prev = nat.active_isa()
    nat.set_isa_cap(request.param)
    yield request.param
    nat.set_isa_cap(prev)


def _expected_conv(x, w, b, zp, stride, padding, groups):
    xp = F.pad(x.to(torch.float64) - zp, (padding, padding, padding, padding))  # padding = zp -> 0 after centring
    y = F.conv2d(xp, w.to(torch.float64), None, stride, 0, 1, groups)
    return torch.round(y).to(torch.int64) + b.to(torch.int64).reshape(1, -1, 1, 1)


@pytest.mark.parametrize("zp", [0, 5, 24])
def test_linear_zero_point(path: str, zp: int):
    g = torch.Generator().manual_seed(zp)
    K_x, K_w = 12, 10
    x = torch.randint(0, 2 * K_x + 1, (3, 70), generator=g, dtype=torch.uint8)
    w = torch.randint(-K_w, K_w + 1, (20, 70), generator=g, dtype=torch.int8)
    b = torch.randint(-500, 500, (20,), generator=g, dtype=torch.int32)
    want = (x.to(torch.int64) - zp) @ w.to(torch.int64).t() + b.to(torch.int64)
    got = w46_linear(x, pack_w46(w, K_x, K_w), b, None, zp)
    assert got.dtype == torch.int32 and torch.equal(got.to(torch.int64), want)


# B, C, H, N, stride, padding, groups: the direct path (C % 4 == 0), im2col (C = 3), one input channel
# (the first layer of an MNIST net), a grouped and a depthwise layer
CASES = [(1, 8, 9, 16, 1, 1, 1), (2, 3, 7, 5, 2, 1, 1), (1, 1, 10, 32, 1, 1, 1), (1, 8, 6, 8, 1, 2, 2),
         (1, 8, 6, 8, 1, 1, 8)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("zp", [0, 3, 28])
def test_conv_zero_point_in_padding(path: str, case, zp: int):
    B, C, H, N, s, p, groups = case
    g = torch.Generator().manual_seed(100 * zp + C)
    K_x, K_w = 14, 9
    x = torch.randint(0, 2 * K_x + 1, (B, C, H, H), generator=g, dtype=torch.uint8)
    w = torch.randint(-K_w, K_w + 1, (N, C // groups, 3, 3), generator=g, dtype=torch.int8)
    b = torch.randint(-500, 500, (N,), generator=g, dtype=torch.int32)
    got = w46_conv2d(x, pack_w46(w, K_x, K_w), b, None, s, p, 1, groups, zp)
    assert torch.equal(got.to(torch.int64), _expected_conv(x, w, b, zp, s, p, groups))


def test_zero_point_out_of_range():
    p = pack_w46(torch.zeros(4, 8, dtype=torch.int8), 12, 10)
    for bad in (-1, 25):
        with pytest.raises(ValueError, match=r"zero point .* outside \[0, 2\*K_x\] = \[0, 24\]"):
            w46_linear(torch.zeros(1, 8, dtype=torch.uint8), p, None, None, bad)
