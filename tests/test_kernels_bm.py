"""BM kernels (lowbit.kernels.bm, csrc/bm*.cpp) against the plain-PyTorch reference.

Every dispatch path this CPU can run is tested (others are skipped with the reason). Integer results must
be identical to ``bm_linear_ref`` / ``bm_conv2d_ref``: raw maxima and the full epilogue, 8- and 16-bit
codes, signed and unsigned inputs, extreme codes (MIN, 0), remainders of every tile, convolution
geometry and thread count. The float max-plus must match torch's max / argmax exactly.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.bm import (
    BMEpilogue,
    bm_conv2d,
    bm_conv2d_ref,
    bm_linear,
    bm_linear_ref,
    f32_maxplus,
    f32_maxplus_backward,
    log_table,
    min_code,
    pack_bm,
)

try:
    from lowbit import _native as nat

    HAVE_NATIVE = hasattr(nat, "bm_pack")
except ImportError:  # pragma: no cover - depends on the build
    nat = None
    HAVE_NATIVE = False

ISAS = ["portable", "avx2", "avx512bw"]
_ORDER = {"portable": 0, "neon": 1, "avx2": 2, "avx512bw": 3, "vnni": 4}


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest):
    if not HAVE_NATIVE:
        pytest.skip("lowbit._native is not built")
    best = nat.best_isa()
    if request.param != "portable" and (best == "neon" or _ORDER[request.param] > _ORDER[best]):
        pytest.skip(f"this CPU cannot run the {request.param} path (best ISA here: {best})")
    prev = nat.active_isa()
    nat.set_isa_cap(request.param)
    assert nat.bm_path() == request.param
    yield request.param
    nat.set_isa_cap(prev)


def _codes(shape: tuple[int, ...], bits: int, g: torch.Generator, p_min: float = 0.15) -> torch.Tensor:
    """Weight codes in [MIN, 0] with MIN (zero weight), 0 (largest weight) and everything between."""
    mn = min_code(bits)
    c = torch.randint(mn + 1, 1, shape, generator=g, dtype=torch.int64)
    r = torch.rand(shape, generator=g)
    c = torch.where(r < p_min, mn, c)
    c = torch.where(r > 0.95, 0, c)
    return c.to(torch.int16)


def _epilogue(n: int, bits: int, f: int, g: torch.Generator, zp: int = 7, bias: bool = True) -> BMEpilogue:
    T = torch.randint(1 << 27, 1 << 30, (1 << f,), generator=g, dtype=torch.int32)
    b = torch.randint(-(1 << 24), 1 << 24, (n,), generator=g, dtype=torch.int32) if bias else None
    return BMEpilogue(T, f, sh=9, F=8, bias=b, zp=zp, lo=3, hi=250)


CASES = [  # (M, N, K)
    (1, 1, 1), (1, 16, 4), (3, 17, 5), (9, 33, 63), (13, 40, 257), (8, 16, 64), (17, 5, 130),
]


@pytest.mark.parametrize("bits,f", [(8, 4), (16, 8), (16, 12)])
@pytest.mark.parametrize("zin", [0, 100])
def test_linear_raw_and_epilogue(isa: str, bits: int, f: int, zin: int):
    g = torch.Generator().manual_seed(bits * 100 + f + zin)
    L = log_table(f, bits)
    for M, N, K in CASES:
        x = torch.randint(0, 256, (M, K), generator=g, dtype=torch.uint8)
        cp, cn = _codes((N, K), bits, g), _codes((N, K), bits, g)
        w = pack_bm(cp, cn, bits)
        raw = bm_linear(x, zin, w, L)
        assert raw.shape == (M, 4, N)
        assert torch.equal(raw, bm_linear_ref(x, zin, cp, cn, bits, L)), (M, N, K)
        epi = _epilogue(N, bits, f, g)
        got = bm_linear(x, zin, w, L, epi)
        assert got.dtype == torch.uint8 and got.shape == (M, N)
        assert torch.equal(got, bm_linear_ref(x, zin, cp, cn, bits, L, epi)), (M, N, K)


def test_unsigned_input_has_no_negative_branches(isa: str):
    g = torch.Generator().manual_seed(3)
    L = log_table(4, 8)
    x = torch.randint(0, 256, (5, 70), generator=g, dtype=torch.uint8)
    w = pack_bm(_codes((20, 70), 8, g), _codes((20, 70), 8, g), 8)
    raw = bm_linear(x, 0, w, L)
    assert (raw[:, 2:] == min_code(8)).all()
    assert (raw[:, :2] > min_code(8)).any()


@pytest.mark.parametrize("bits", [8, 16])
def test_extreme_codes(isa: str, bits: int):
    """Every code at 0 (largest values: sums reach 0), every code at MIN, and zero input: the sums
    saturate at MIN exactly as the reference says."""
    mn = min_code(bits)
    f = 4 if bits == 8 else 8
    L = log_table(f, bits)
    M, N, K = 11, 35, 77
    x255 = torch.full((M, K), 255, dtype=torch.uint8)
    zeros = torch.zeros(N, K, dtype=torch.int16)
    mins = torch.full((N, K), mn, dtype=torch.int16)
    for x, zin in ((x255, 0), (x255, 255), (torch.zeros(M, K, dtype=torch.uint8), 0)):
        for cp, cn in ((zeros, mins), (mins, zeros), (zeros, zeros), (mins, mins)):
            w = pack_bm(cp, cn, bits)
            assert torch.equal(bm_linear(x, zin, w, L), bm_linear_ref(x, zin, cp, cn, bits, L))
    # near-MIN activations meet near-MIN weights: saturation at the low end
    x1 = torch.ones(M, K, dtype=torch.uint8)
    w1 = torch.full((N, K), mn + 1, dtype=torch.int16)
    got = bm_linear(x1, 0, pack_bm(w1, w1, bits), L)
    assert torch.equal(got, bm_linear_ref(x1, 0, w1, w1, bits, L))
    assert (got[:, :2] == mn).all()


CONV_CASES = [  # (B, C, H, W, N, k, stride, padding, dilation, groups)
    (1, 1, 5, 5, 3, 3, 1, 1, 1, 1),
    (2, 3, 7, 6, 16, 3, 2, 1, 1, 1),
    (1, 8, 6, 6, 8, 3, 1, 1, 1, 8),
    (1, 4, 9, 9, 6, (3, 2), (2, 1), (0, 2), (2, 1), 2),
    (1, 33, 4, 4, 17, 1, 1, 0, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bits,f", [(8, 4), (16, 10)])
def test_conv2d(isa: str, case, bits: int, f: int):
    B, C, H, W, N, k, s, p, d, groups = case
    g = torch.Generator().manual_seed(B * 31 + C * 7 + N + bits)
    kh, kw = (k, k) if isinstance(k, int) else k
    L = log_table(f, bits)
    x = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    cp, cn = _codes((N, C // groups, kh, kw), bits, g), _codes((N, C // groups, kh, kw), bits, g)
    w = pack_bm(cp, cn, bits)
    for zin in (0, 128):
        raw = bm_conv2d(x, zin, w, L, None, s, p, d, groups)
        assert torch.equal(raw, bm_conv2d_ref(x, zin, cp, cn, bits, L, None, s, p, d, groups))
        epi = _epilogue(N, bits, f, g, zp=128)
        got = bm_conv2d(x, zin, w, L, epi, s, p, d, groups)
        ref = bm_conv2d_ref(x, zin, cp, cn, bits, L, epi, s, p, d, groups)
        assert got.shape == ref.shape and torch.equal(got, ref), case


def test_threads_identical(isa: str):
    g = torch.Generator().manual_seed(5)
    L = log_table(8, 16)
    x = torch.randint(0, 256, (2, 16, 9, 9), generator=g, dtype=torch.uint8)
    cp, cn = _codes((24, 16, 3, 3), 16, g), _codes((24, 16, 3, 3), 16, g)
    w, epi = pack_bm(cp, cn, 16), _epilogue(24, 16, 8, g)
    prev = nat.num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            nat.set_num_threads(t)
            outs.append(bm_conv2d(x, 3, w, L, epi, padding=1))
        assert all(torch.equal(outs[0], o) for o in outs[1:])
    finally:
        nat.set_num_threads(prev)


def test_log_table():
    L8 = log_table(4, 8)
    assert L8.dtype == torch.int16 and L8.numel() == 256
    assert int(L8[0]) == -128 and int(L8[255]) == 0 and int(L8[1]) == -127  # clamped into the valid range
    assert int(L8[128]) == -16  # one octave below 255 (-0.0113 octave rounds away)
    assert (L8[1:].diff() >= 0).all()
    L16 = log_table(8, 16)
    assert int(L16[0]) == -32768 and int(L16[1]) == round(-256 * 7.994353436858858)
    with pytest.raises(ValueError, match="coarser step or wider codes"):
        log_table(5, 8)
    with pytest.raises(ValueError, match="8 or 16"):
        log_table(4, 4)


def test_bad_inputs():
    g = torch.Generator().manual_seed(0)
    L = log_table(4, 8)
    cp = _codes((4, 6), 8, g)
    w = pack_bm(cp, cp, 8)
    x = torch.zeros(2, 6, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        bm_linear(x.to(torch.int8), 0, w, L)
    with pytest.raises(ValueError, match="features"):
        bm_linear(torch.zeros(2, 5, dtype=torch.uint8), 0, w, L)
    with pytest.raises(ValueError, match="zero point"):
        bm_linear(x, 300, w, L)
    with pytest.raises(ValueError, match=r"\[-128, 0\]"):
        pack_bm(cp + 1, cp, 8)
    with pytest.raises(TypeError, match="integers"):
        pack_bm(cp.float(), cp, 8)
    with pytest.raises(ValueError, match="log table"):
        bm_linear(x, 0, w, L[:100])
    with pytest.raises(ValueError, match="log table entries"):
        bm_linear(x, 0, w, log_table(8, 16))
    with pytest.raises(ValueError, match="exp table"):
        BMEpilogue(torch.zeros(8, dtype=torch.int32), 4, 9, 8)
    wc = pack_bm(_codes((4, 3, 3, 3), 8, g), _codes((4, 3, 3, 3), 8, g), 8)
    with pytest.raises(ValueError, match="channels"):
        bm_conv2d(torch.zeros(1, 4, 5, 5, dtype=torch.uint8), 0, wc, L)
    with pytest.raises(ValueError, match="too small"):
        bm_conv2d(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), 0, wc, L)
    if HAVE_NATIVE:  # the binding's own checks (what the Python layer would otherwise catch)
        with pytest.raises(ValueError, match="shape"):
            nat.bm_linear(x.data_ptr(), 2, 7, 7, w.native(1), L.data_ptr(), 0, 0, 4, 9, 8, 0, 0, 0, 255, True,
                          torch.empty(2, 4, 4, dtype=torch.int32).data_ptr())
        with pytest.raises(ValueError, match="width"):
            nat.bm_pack(cp.data_ptr(), cp.data_ptr(), 4, 6, 1, 4)
        idx, gr = torch.full((2, 3), 5, dtype=torch.int32), torch.ones(2, 3)
        with pytest.raises(ValueError, match="index out of range"):
            nat.bm_f32_maxplus_backward(idx.data_ptr(), gr.data_ptr(), 2, 3, 5, torch.zeros(2, 5).data_ptr(), 0)
        with pytest.raises(ValueError, match="stride"):
            nat.bm_conv2d(x.data_ptr(), 1, 3, 5, 5, wc.native(1), 3, 3, 0, 1, 1, 1, 1, 1, 1, L.data_ptr(), 0, 0,
                          4, 9, 8, 0, 0, 0, 255, True, x.data_ptr())


@pytest.mark.skipif(not HAVE_NATIVE, reason="native extension not built")
def test_bm_binding_checks_inputs():
    """Raw-binding arguments the Python layer would refuse are ValueErrors naming the binding (never a crash or
    a silently different result); an empty batch returns without touching the (null) buffers."""
    g = torch.Generator().manual_seed(1)
    cp = _codes((4, 6), 8, g)
    w = pack_bm(cp, cp, 8).native(1)
    L, T = log_table(4, 8), torch.zeros(16, dtype=torch.int32)
    x = torch.zeros(2, 6, dtype=torch.uint8)
    out = torch.zeros(2, 4, dtype=torch.uint8)
    xp, Lp, Tp, op = x.data_ptr(), L.data_ptr(), T.data_ptr(), out.data_ptr()
    nat.bm_linear(xp, 2, 6, 6, w, Lp, Tp, 0, 4, 9, 8, 0, 0, 0, 255, False, op)  # valid
    bad = {
        "null input": (0, 2, 6, 6, w, Lp, Tp, 0, 4, 9, 8, 0, 0, 0, 255, False, op),
        "null output": (xp, 2, 6, 6, w, Lp, Tp, 0, 4, 9, 8, 0, 0, 0, 255, False, 0),
        "row stride": (xp, 2, 6, 5, w, Lp, Tp, 0, 4, 9, 8, 0, 0, 0, 255, False, op),
        "log table": (xp, 2, 6, 6, w, 0, Tp, 0, 4, 9, 8, 0, 0, 0, 255, False, op),
        "exp table": (xp, 2, 6, 6, w, Lp, 0, 0, 4, 9, 8, 0, 0, 0, 255, False, op),
        "log step bits": (xp, 2, 6, 6, w, Lp, Tp, 0, 15, 9, 8, 0, 0, 0, 255, False, op),
        "exp shift": (xp, 2, 6, 6, w, Lp, Tp, 0, 4, 63, 8, 0, 0, 0, 255, False, op),
        "output shift": (xp, 2, 6, 6, w, Lp, Tp, 0, 4, 9, 31, 0, 0, 0, 255, False, op),
        "input zero point": (xp, 2, 6, 6, w, Lp, Tp, 0, 4, 9, 8, 256, 0, 0, 255, False, op),
        "output zero point": (xp, 2, 6, 6, w, Lp, Tp, 0, 4, 9, 8, 0, -1, 0, 255, False, op),
        "output clamp": (xp, 2, 6, 6, w, Lp, Tp, 0, 4, 9, 8, 0, 0, 9, 8, False, op),
        "negative row count": (xp, -1, 6, 6, w, Lp, Tp, 0, 4, 9, 8, 0, 0, 0, 255, False, op),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError, match=f"bm_linear: .*{what}"):
            nat.bm_linear(*args)
    nat.bm_linear(0, 0, 6, 6, w, Lp, Tp, 0, 4, 9, 8, 0, 0, 0, 255, False, 0)  # empty batch: nothing read or written
    wc = pack_bm(_codes((4, 3, 3, 3), 8, g), _codes((4, 3, 3, 3), 8, g), 8)
    with pytest.raises(ValueError, match="bm_conv2d: weight does not match"):
        nat.bm_conv2d(xp, 1, 4, 5, 5, wc.native(1), 3, 3, 1, 1, 0, 0, 1, 1, 1, Lp, Tp, 0, 4, 9, 8, 0, 0, 0, 255,
                      False, op)
    nat.bm_conv2d(0, 0, 3, 5, 5, wc.native(1), 3, 3, 1, 1, 0, 0, 1, 1, 1, Lp, Tp, 0, 4, 9, 8, 0, 0, 0, 255, False, 0)
    with pytest.raises(ValueError, match="bm_pack: null weight pointer"):
        nat.bm_pack(0, cp.data_ptr(), 4, 6, 1, 8)
    with pytest.raises(ValueError, match="bm_f32_maxplus: row stride"):
        nat.bm_f32_maxplus(xp, 2, 6, 5, xp, 4, op, 0)


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7), (13, 33, 40), (64, 70, 300)])
def test_f32_maxplus(isa: str, shape):
    M, N, K = shape
    g = torch.Generator().manual_seed(M + N + K)
    X = torch.randn(M, K, generator=g)
    V = torch.randn(N, K, generator=g)
    X[0, : K // 2] = -float("inf")  # log 0
    if M > 1:
        X[1] = -float("inf")
    X[-1, -1] = 50.0
    V[:, 0] = V[:, -1]  # ties: the first maximum wins
    X[-1, 0] = 50.0
    ref = (X[:, None, :] + V[None]).max(-1)
    Y, arg = f32_maxplus(X, V)
    assert torch.equal(Y, ref.values)
    assert torch.equal(arg.long(), ref.indices)
    Y2, none = f32_maxplus(X, V, with_index=False)
    assert none is None and torch.equal(Y2, ref.values)
    # the backward pass: the output gradient lands on the arg-max terms (as torch.max's backward)
    G = torch.randn(M, N, generator=g)
    Xr, Vr = X.clone().requires_grad_(), V.clone().requires_grad_()
    ((Xr[:, None, :] + Vr[None]).max(-1).values * G).sum().backward()
    gX, gV = f32_maxplus_backward(arg, G, K)
    assert torch.allclose(gX, Xr.grad, rtol=1e-6, atol=1e-6) and torch.allclose(gV, Vr.grad, rtol=1e-6, atol=1e-6)


def test_torch_fallback(monkeypatch: pytest.MonkeyPatch):
    g = torch.Generator().manual_seed(1)
    monkeypatch.setenv("LOWBIT_KERNELS", "torch")
    L = log_table(4, 8)
    x = torch.randint(0, 256, (3, 9), generator=g, dtype=torch.uint8)
    cp, cn = _codes((5, 9), 8, g), _codes((5, 9), 8, g)
    epi = _epilogue(5, 8, 4, g)
    assert torch.equal(bm_linear(x, 9, pack_bm(cp, cn, 8), L, epi), bm_linear_ref(x, 9, cp, cn, 8, L, epi))
    X, V = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)
    Y, arg = f32_maxplus(X, V)
    ref = (X[:, None, :] + V[None]).max(-1)
    assert torch.equal(Y, ref.values) and torch.equal(arg.long(), ref.indices)


@pytest.mark.slow
def test_avx512_path_under_emulation(tmp_path):
    """The AVX-512 BM kernels cannot run on CPUs without AVX-512: csrc/bm_avx512_emu_check.cc compiles them
    with scalar emulations of their intrinsics and compares them with the portable panels (~10 s)."""
    import os
    import platform
    import shutil
    import subprocess

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-only check")
    if HAVE_NATIVE and _ORDER.get(nat.best_isa(), 0) >= _ORDER["avx512bw"] and not os.environ.get("LOWBIT_SLOW_TESTS"):
        pytest.skip("this CPU runs the AVX-512 path natively (tested above); LOWBIT_SLOW_TESTS=1 runs the emulation")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")
    if not os.path.exists(os.path.join(csrc, "bm_avx512_emu_check.cc")):
        pytest.skip("sources not available")
    srcs = ["bm_avx512_emu_check.cc", "bm.cpp", "bm_avx2.cpp", "parallel.cpp", "cpu_features.cpp"]
    exe = str(tmp_path / "bm_emu")
    cmd = [cxx, "-std=c++17", "-O1", "-ffp-contract=off", f"-I{csrc}", *[os.path.join(csrc, s) for s in srcs],
           "-pthread", "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    res = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert " 0 mismatches" in res.stdout
