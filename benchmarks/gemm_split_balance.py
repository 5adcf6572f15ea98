"""How evenly the int8 GEMM driver splits ResNet-18's convolutions over 2 threads, before and after s4-14b.

A model of the work split of csrc/int8_driver.cpp ``gemm`` on the VNNI path (rows x 16-column blocks per
thread, after parallel_for's contiguous split); 1.000 = both threads get the same work, 1.3 = the slower
thread has 30% more than half. Run: ``python benchmarks/gemm_split_balance.py``.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_blocking(k: int) -> tuple[int, int]:
    """(mr, largest rows per chunk) of the VNNI path: the packed panel rows x K stays in L2."""
    mr, mc = 8, (192 * 1024) // max(cdiv(k, 4) * 4, 1)
    return mr, min(128, max(mr, mc // mr * mr))


def contiguous(njobs: int, grain: int, nt: int) -> list[range]:
    nch = min(nt, cdiv(njobs, grain))
    step = cdiv(njobs, nch)
    return [range(c * step, min(njobs, (c + 1) * step)) for c in range(nch)]


def per_thread(m: int, n: int, k: int, new: bool, nt: int = 2) -> list[int]:
    nb = cdiv(n, 16)
    mr, mc = row_blocking(k)
    units = cdiv(m, mr)
    if new:
        mch, ng = min(units, cdiv(m, mc)), 1
        if mch >= nt:
            mch = min(units, cdiv(mch, nt) * nt)
        else:
            ng = min(nb, cdiv(nt, mch))
        bounds = [((i * units // mch) * mr, min(m, ((i + 1) * units // mch) * mr)) for i in range(mch)]
        job_macs = (m // mch) * (nb * 16 // ng) * k
    else:
        mch = cdiv(m, mc)
        ng = min(nb, max(1, cdiv(nt * 4, mch)))
        bounds = [(i * mc, min(m, (i + 1) * mc)) for i in range(mch)]
        job_macs = min(m, mc) * (nb * 16 // ng) * k
    grain = max(1, (1 << 18) // max(1, job_macs))

    def work(j: int) -> int:
        mi, gi = divmod(j, ng)
        m0, m1 = bounds[mi]
        return max(0, m1 - m0) * ((gi + 1) * nb // ng - gi * nb // ng)

    return [sum(work(j) for j in r) for r in contiguous(mch * ng, grain, nt)]


# (layer, rows = output pixels, output channels, K); 7x7 stem rows padded to 24 bytes (kw*c + kpad)
LAYERS = [("stem 7x7/2 3->64", 112 * 112, 64, 7 * 24), ("3x3 64 @56", 56 * 56, 64, 576),
          ("3x3/2 64->128 @28", 28 * 28, 128, 576), ("3x3 128 @28", 28 * 28, 128, 1152),
          ("1x1/2 64->128 @28", 28 * 28, 128, 64), ("3x3/2 128->256 @14", 14 * 14, 256, 1152),
          ("3x3 256 @14", 14 * 14, 256, 2304), ("1x1/2 128->256 @14", 14 * 14, 256, 128),
          ("3x3/2 256->512 @7", 7 * 7, 512, 2304), ("3x3 512 @7", 7 * 7, 512, 4608),
          ("1x1/2 256->512 @7", 7 * 7, 512, 256), ("fc 512->1000", 1, 1000, 512)]


def main() -> None:
    print(f"{'layer':22s} {'before':>8s} {'after':>8s}   (slower thread's work / half of the total)")
    for name, m, n, k in LAYERS:
        old, new = per_thread(m, n, k, False), per_thread(m, n, k, True)
        print(f"{name:22s} {max(old) / (sum(old) / 2):8.3f} {max(new) / (sum(new) / 2):8.3f}")


if __name__ == "__main__":
    main()
