"""Where 2-thread scaling is lost on a whole model: 1 vs 2 threads, interleaved in one process.

    python benchmarks/thread_scaling.py [resnet18|mobilenetv2|resnet20|mobilenet] [rounds]

Prints the median forward time at 1 thread, at 2 threads, and at 2 threads with the pool's idle spin
off (``spin_us = 0``: workers sleep at once, every kernel call wakes them through the condition
variable), the speed-ups, the per-layer kernel scaling from ``lowbit profile`` and the CPU share other
processes used while timing.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from lowbit import _native
from lowbit.bench.models import _Load, cpu_description
from lowbit.bench.nets import make_net
from lowbit.kernels import native
from lowbit.methods.api import quantize


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    m, side = make_net(name)
    torch.manual_seed(0)
    x = torch.randn(1, 3, side, side)
    q = quantize(m, "static", torch.randn(8, 3, side, side), example_input=x, progress=False)
    spin = getattr(_native, "set_spin_us", None)
    default_spin = _native.spin_us() if spin else None
    configs = [("1 thread", 1, default_spin), ("2 threads", 2, default_spin)]
    if spin:
        configs.append(("2 threads, no spin", 2, 0))
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    load = _Load()
    load.start()
    with torch.inference_mode():
        for _ in range(rounds):
            for label, nt, us in configs:
                torch.set_num_threads(nt)
                native.set_num_threads(nt)
                if spin:
                    spin(us)
                for _ in range(2):
                    q(x)
                t0 = time.perf_counter()
                for _ in range(5):
                    q(x)
                times[label].append((time.perf_counter() - t0) / 5 * 1e3)
    load.stop()
    if spin:
        spin(default_spin)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name} @{side}, {cpu_description()}; other processes used {100 * load.mean:.0f}% of the CPU")
    for k, v in med.items():
        print(f"  {k:20s} {v:8.3f} ms   x{med['1 thread'] / v:.2f} vs 1 thread")
    try:
        from lowbit.profile import profile_model
    except ImportError:
        return
    p1, p2 = (profile_model(q, x, threads=n, repeats=rounds) for n in (1, 2))
    print(f"  profile: kernels {p1.kernel_ms:.2f} -> {p2.kernel_ms:.2f} ms (x{p1.kernel_ms / p2.kernel_ms:.2f}), "
          f"outside kernels {p1.parts_ms - p1.kernel_ms:.2f} -> {p2.parts_ms - p2.kernel_ms:.2f} ms "
          f"({p1.mode}); per layer, kernel ms at 1 -> 2 threads:")
    two = {r.name: r for r in p2.layers}
    for r in sorted(p1.layers, key=lambda r: -r.kernel_ms)[:12]:
        k2 = two[r.name].kernel_ms if r.name in two else float("nan")
        print(f"    {r.name:24s} {r.shape:18s} {r.kernel_ms:7.3f} -> {k2:7.3f}  x{r.kernel_ms / k2 if k2 else 0:.2f}")


if __name__ == "__main__":
    main()
