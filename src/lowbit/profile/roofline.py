"""This machine's ceilings, measured once per process: the int8 multiply-accumulate rate of lowbit's
own GEMM kernel and the copy bandwidth of main memory, each for a thread count and kernel path.

A layer cannot run faster than ``MACs / peak`` (compute bound) nor than ``bytes moved / bandwidth``
(memory bound); the larger of the two is its roofline bound, and ``time / bound`` says how far it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["Ceilings", "ceilings", "layer_bound"]

_PEAK_MNK = (512, 512, 1024)  # large enough that packing and hand-off are noise (0.27 GMAC)
_COPY_BYTES = 64 << 20  # far beyond the caches: main-memory bandwidth
_CACHE: dict[tuple[int, str], Ceilings] = {}


@dataclass(frozen=True)
class Ceilings:
    threads: int
    isa: str
    peak_gmacs: float  # int8 GMAC/s of the GEMM kernel (best of the repeats)
    copy_gbs: float  # GB/s counting bytes read + written (best of the repeats)


def _best(fn: object, budget_s: float = 0.25) -> float:
    """Best time of 2..5 calls, as many as fit ``budget_s`` (the portable path is slow)."""
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    best = time.perf_counter() - t0
    for _ in range(max(1, min(4, int(budget_s / max(best, 1e-9))))):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(threads: int) -> Ceilings:
    from lowbit.kernels import native

    m, n, k = _PEAK_MNK
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    w = native.pack_int8(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g))
    src = torch.ones(_COPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    torch_before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with native.threads(threads):
            t_gemm = _best(lambda: native.int8_gemm(x, 128, w))
            t_copy = _best(lambda: dst.copy_(src))
            isa = native.int8_isa()
    finally:
        torch.set_num_threads(torch_before)
    return Ceilings(threads, isa, m * n * k / t_gemm / 1e9, 2 * _COPY_BYTES / t_copy / 1e9)


def ceilings(threads: int) -> Ceilings:
    """The ceilings for ``threads`` threads on the int8 path in force now (measured at the first call)."""
    from lowbit.kernels import native

    key = (int(threads), native.int8_isa())
    if key not in _CACHE:
        _CACHE[key] = _measure(int(threads))
    return _CACHE[key]


def layer_bound(macs: int, nbytes: int, c: Ceilings, int8_macs: bool) -> tuple[float, str]:
    """(bound in ms, "compute" or "memory"): the roofline time of a layer. Only int8-kernel MACs (int8
    and 4.6-bit layers) count against the int8 peak; other layers are bounded by memory alone."""
    mem_ms = nbytes / (c.copy_gbs * 1e9) * 1e3
    comp_ms = macs / (c.peak_gmacs * 1e9) * 1e3 if int8_macs else 0.0
    return (comp_ms, "compute") if comp_ms >= mem_ms else (mem_ms, "memory")
