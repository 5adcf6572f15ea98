"""An independent specification of lowbit's integer arithmetic, for the tests.

Written from the documented formulas (README "Numerics", methods.md §0-§3) with NumPy and Python integers
only: nothing here imports lowbit or calls a lowbit helper, so a test that compares lowbit with these
functions fails when lowbit's arithmetic is wrong, whichever backend (native path or torch) runs it.

Conventions: arrays in, arrays out; integer results as int64 arrays (callers compare after casting);
float results in float32 with the same operation order as the spec (no fused multiply-add).
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ------------------------------------------------------------------------------------ quantization


def qparams(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool = False, signed: bool = False,
            eps: float = 1e-12) -> tuple[np.float32, int]:
    """Scale (float32) and zero point of the range [lo, hi] widened to include 0 (methods.md §0), in float64:
    asymmetric ``s = (hi - lo) / (qmax - qmin)``, ``z = clamp(round_half_even(qmin - lo / s))``; symmetric
    signed ``s = max(|lo|, |hi|) / min(-qmin, qmax)``, z = 0. An empty range (all zeros) gets s = 1."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric and signed:
        s, z = max(-lo, hi) / float(min(-qmin, qmax)), 0
    elif symmetric:
        s, z = 2 * max(-lo, hi) / float(qmax - qmin), (qmin + qmax + 1) // 2
    else:
        s = (hi - lo) / float(qmax - qmin)
        z = int(min(max(round(qmin - lo / max(s, eps)), qmin), qmax))  # Python round: half to even
    return np.float32(max(s, eps) if hi > lo else 1.0), z


def quantize(x: np.ndarray, scale, zp, qmin: int, qmax: int) -> np.ndarray:
    """``clamp(round_half_even(float32(x) / scale) + zp, qmin, qmax)`` (scale float32, broadcast)."""
    q = np.rint(np.asarray(x, np.float32) / np.asarray(scale, np.float32)) + np.asarray(zp, np.float32)
    return np.clip(q, qmin, qmax).astype(np.int64)


def dequantize(q: np.ndarray, scale, zp) -> np.ndarray:
    return (np.asarray(q, np.int64) - np.asarray(zp, np.int64)).astype(np.float32) * np.asarray(scale, np.float32)


def multiplier(m: float) -> tuple[int, int]:
    """Real multiplier -> (Q31 mantissa in [2^30, 2^31), right shift): ``m ~= m0 * 2^-rshift``."""
    mant, exp = math.frexp(float(m))
    q = round(mant * 2**31)
    if q == 2**31:
        q //= 2
        exp += 1
    rshift = 31 - exp
    assert 1 <= rshift <= 62, m
    return q, rshift


def requant(acc: np.ndarray, m0, rshift, zp: int, lo: int, hi: int) -> np.ndarray:
    """``clamp(((acc * m0 + 2^(r-1)) >> r) + zp, lo, hi)`` in exact integers (arithmetic shift, half up).
    m0 / rshift broadcast against acc (per channel: reshape them to the channel axis first)."""
    acc, m0, r = np.asarray(acc, np.int64), np.asarray(m0, np.int64), np.asarray(rshift, np.int64)
    assert np.all((r >= 1) & (r <= 62))
    v = (acc * m0 + (np.int64(1) << (r - 1))) >> r  # |acc * m0| < 2^62: exact in int64; >> floors
    return np.clip(v + zp, lo, hi)


def float_out(acc: np.ndarray, scale, bias=None) -> np.ndarray:
    """``float32(acc) * scale (+ bias)``: two float32 roundings."""
    y = np.asarray(acc, np.int64).astype(np.float32) * np.asarray(scale, np.float32)
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return y.astype(np.float32)


def act_clamp(act: str | None, zp: int, scale: float, qmin: int = 0, qmax: int = 255) -> tuple[int, int]:
    """The clamp a fused ReLU / ReLU6 puts on output codes."""
    if act in (None, "", "none"):
        return qmin, qmax
    lo = max(qmin, zp)
    if act == "relu":
        return lo, qmax
    assert act == "relu6", act
    return lo, min(qmax, zp + round(6.0 / scale))


# ------------------------------------------------------------------------------------ accumulators


def linear_acc(x_centred: np.ndarray, w: np.ndarray, bias=None) -> np.ndarray:
    """``sum_k x[m, k] * w[n, k] (+ bias[n])`` in int64; x already centred (code - zero point)."""
    acc = np.asarray(x_centred, np.int64) @ np.asarray(w, np.int64).T
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    return acc


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def conv_acc(x_centred: np.ndarray, w: np.ndarray, bias=None, stride=1, padding=0, dilation=1, groups: int = 1,
             pad_value: int = 0) -> np.ndarray:
    """Direct NCHW convolution in int64 of centred inputs; padded positions hold ``pad_value`` (0 = real
    zero for affine codes; +-1 for binary signs). Returns [B, N, Ho, Wo]."""
    x = np.asarray(x_centred, np.int64)
    w = np.asarray(w, np.int64)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    B, C, H, W = x.shape
    N, Cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    ng = N // groups
    out = np.zeros((B, N, Ho, Wo), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh : i * dh + sh * (Ho - 1) + 1 : sh, j * dw : j * dw + sw * (Wo - 1) + 1 : sw]
            for g in range(groups):
                out[:, g * ng : (g + 1) * ng] += np.einsum(
                    "bchw,nc->bnhw", patch[:, g * Cg : (g + 1) * Cg], w[g * ng : (g + 1) * ng, :, i, j]
                )
    if bias is not None:
        out += np.asarray(bias, np.int64).reshape(1, -1, 1, 1)
    return out


def check_int32(acc: np.ndarray) -> np.ndarray:
    assert acc.size == 0 or (acc.min() >= INT32_MIN and acc.max() <= INT32_MAX), "accumulator leaves int32"
    return acc


def epilogue(acc: np.ndarray, kind: str, axis: int, **p) -> np.ndarray:
    """``kind``: none | requant (m0, rshift, zp, lo, hi: per channel along ``axis``) | float (scale, bias)."""
    acc = check_int32(acc)
    shape = [1] * acc.ndim
    shape[axis] = -1

    def ch(v):
        v = np.asarray(v)
        return v.reshape(shape) if v.size > 1 else v.reshape(())

    if kind == "none":
        return acc
    if kind == "requant":
        return requant(acc, ch(p["m0"]), ch(p["rshift"]), p["zp"], p["lo"], p["hi"])
    assert kind == "float", kind
    return float_out(acc, ch(p["scale"]), None if p.get("bias") is None else ch(p["bias"]))


# ------------------------------------------------------------------------------------------ binary


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Bool [..., K] -> int64 words [..., ceil(K/64)]: bit k%64 of word k//64 (little-endian), padding 0."""
    bits = np.asarray(bits, bool)
    K = bits.shape[-1]
    KW = (K + 63) // 64
    padded = np.zeros((*bits.shape[:-1], KW * 64), bool)
    padded[..., :K] = bits
    by = np.packbits(padded, axis=-1, bitorder="little")  # [..., KW*8] bytes, byte j = bits 8j..8j+7
    return np.ascontiguousarray(by).view("<u8").astype(np.uint64).view(np.int64)


def threshold_bits(dot: np.ndarray, thr, flip=None, axis: int = -1) -> np.ndarray:
    """Binary output epilogue: ``(dot >= thr[n]) XOR flip[n]``, packed along the channel axis (moved last)."""
    shape = [1] * dot.ndim
    shape[axis] = -1
    b = dot >= np.asarray(thr, np.int64).reshape(shape)
    if flip is not None:
        b = b ^ np.asarray(flip, bool).reshape(shape)
    return pack_bits(np.moveaxis(b, axis, -1))


# ---------------------------------------------------------------------------------------- element-wise


def add_multipliers(s_a: float, s_b: float, s_out: float) -> tuple[int, int, int]:
    """Residual add: one shift R (that of the larger of M_a = s_a/s_out, M_b = s_b/s_out) and
    m = round_half_even(M * 2^R) for both inputs."""
    ma, mb = s_a / s_out, s_b / s_out
    _, r = multiplier(max(ma, mb))
    return round(ma * 2**r), round(mb * 2**r), r


def add(a: np.ndarray, za: int, b: np.ndarray, zb: int, s: tuple[float, float, float], zo: int, lo: int = 0,
        hi: int = 255) -> np.ndarray:
    """``clamp(((m_a (a - z_a) + m_b (b - z_b) + 2^(R-1)) >> R) + z_o, lo, hi)``: one rounding, half up."""
    ma, mb, r = add_multipliers(*s)
    acc = (np.asarray(a, np.int64) - za) * ma + (np.asarray(b, np.int64) - zb) * mb  # |acc| < 2^41
    return np.clip(((acc + (np.int64(1) << (r - 1))) >> r) + zo, lo, hi)


def avg_pool(x: np.ndarray, kernel, stride, padding, zp: int) -> np.ndarray:
    """Average of codes over each window (padding holds zp), rounded half up: floor((sum + n/2) / n)."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    x = np.pad(np.asarray(x, np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=zp)
    H, W = x.shape[2:]
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    s = np.zeros((*x.shape[:2], Ho, Wo), np.int64)
    for i in range(kh):
        for j in range(kw):
            s += x[:, :, i : i + sh * (Ho - 1) + 1 : sh, j : j + sw * (Wo - 1) + 1 : sw]
    n = kh * kw
    return (s + n // 2) // n


def adaptive_avg_pool(x: np.ndarray, out_hw) -> np.ndarray:
    """Adaptive average pooling of codes: window [floor(i n / o), ceil((i+1) n / o)), rounded half up."""
    oh, ow = _pair(out_hw)
    x = np.asarray(x, np.int64)
    H, W = x.shape[2:]
    out = np.zeros((*x.shape[:2], oh, ow), np.int64)
    for i in range(oh):
        h0, h1 = (i * H) // oh, -(-((i + 1) * H) // oh)
        for j in range(ow):
            w0, w1 = (j * W) // ow, -(-((j + 1) * W) // ow)
            n = (h1 - h0) * (w1 - w0)
            out[:, :, i, j] = (x[:, :, h0:h1, w0:w1].sum((2, 3)) + n // 2) // n
    return out
