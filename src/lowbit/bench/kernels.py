"""``lowbit bench kernels``: lowbit's native kernels against torch and ONNX Runtime on GEMM and conv shapes.

Everything runs in one process. For each case every implementation is warmed up, then timed
round-robin (one call of each implementation per round, in a freshly shuffled order, so slow drifts of
the machine and the after-effects of one kernel on the next hit all of them alike); the figure is the
median wall time of the rounds. Every implementation has its own copies of the operands. Each call
includes the library's own Python-side overhead, as a model would pay it. Threads:
``torch.set_num_threads(threads)``, lowbit's pool and ONNX Runtime's ``intra_op_num_threads`` are all
set to ``threads``.

Cases: GEMM ``(M, N, K)`` = (1, 1024, 1024), (64, 1024, 1024), (1024, 1024, 1024), (3136, 64, 576) and the
3x3 convolutions (padding 1, batch 1) of a ResNet-18-style net at 56x56 (64 -> 64 channels) and 28x28
(128 -> 128). GOP/s counts ``2*M*N*K`` operations (for a conv: M = output pixels, N = output channels,
K = 9 * input channels), whatever the operand width.

What each implementation computes (all from the same random operands):

- ``torch_fp32``: ``F.linear`` / ``F.conv2d`` in float32.
- ``torch_int_mm``: ``torch._int_mm`` (int8 x int8 -> int32); conv: im2col (``F.unfold``) + ``_int_mm``.
- ``torch_ao_int8``: ``torch.ao.nn.quantized.Linear`` / ``Conv2d`` on the x86 engine (quint8 activations,
  per-channel qint8 weights, requantized quint8 output; conv input in channels_last).
- ``onnxruntime_int8`` (when onnxruntime and onnx are installed): ``QLinearMatMul`` / ``QLinearConv``
  (uint8 activations, int8 weights, uint8 output).
- ``lowbit_int8``: ``lowbit.kernels.int8_linear`` / ``int8_conv2d``, requantized uint8 output.
- ``lowbit_w46``: 4.6-bit ``w46_linear`` / ``w46_conv2d`` with (N_x, N_w) = (29, 19), requantized output.
- ``lowbit_binary``: ``binary_linear`` / ``binary_conv2d`` on bit-packed ±1 activations with the
  ``Threshold`` epilogue (bit-packed output: the form in which binary layers chain).
- ``lowbit_bm8`` / ``lowbit_bm16``: the integer BM layer (``lowbit.kernels.bm``) with 8- / 16-bit log codes
  on uint8 input with zero point 0 (a layer after a ReLU: two max-plus products, against the + and -
  weight codes, per output), exp-table epilogue, uint8 output (see lowbit.bm.bench).

The lowbit rows are repeated for every native dispatch path this CPU can run (``path``: ``vnni``,
``avx512bw``, ``avx2``, ``portable``; a path whose kernel is the same as a higher one's is not repeated);
``path`` is empty for the peers; ``LOWBIT_ISA`` (the process cap) bounds the paths measured, so
``LOWBIT_ISA=avx2`` gives the AVX2-level rows on an AVX-512 machine. The ratios compare with
``torch_fp32``, with the faster of the two torch int8 paths on the same case, and (lowbit rows) with
``lowbit_int8`` at the same cap (the int8 kernel that cap runs), e.g. the BM max-plus layer against
the int8 GEMM of the same shape.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lowbit import files

__all__ = ["run", "CASES"]

PATH_ORDER = ("portable", "avx2", "avx512bw", "vnni")
IMPLS = ("torch_fp32", "torch_int_mm", "torch_ao_int8", "onnxruntime_int8", "lowbit_int8", "lowbit_w46",
         "lowbit_binary", "lowbit_bm8", "lowbit_bm16")
_RANK = {"portable": 0, "neon": 1, "avx2": 2, "avx512bw": 3, "vnni": 4}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "gemm" or "conv"
    M: int
    N: int
    K: int
    C: int = 0  # conv: input channels, spatial size H = W, 3x3 kernel, padding 1, batch 1
    H: int = 0

    @property
    def ops(self) -> float:
        return 2.0 * self.M * self.N * self.K


def _gemm(M: int, N: int, K: int) -> Case:
    return Case(f"gemm_{M}x{N}x{K}", "gemm", M, N, K)


def _conv(H: int, C: int) -> Case:
    return Case(f"conv_{H}x{H}_{C}", "conv", H * H, C, 9 * C, C=C, H=H)


CASES = [_gemm(1, 1024, 1024), _gemm(64, 1024, 1024), _gemm(1024, 1024, 1024), _gemm(3136, 64, 576),
         _conv(56, 64), _conv(28, 128)]
QUICK_CASES = [_gemm(1, 128, 256), _gemm(48, 96, 200), _conv(10, 16)]


@dataclass
class Impl:
    impl: str
    path: str
    fn: Callable[[], Any]
    setup: Callable[[], None] = lambda: None
    kernel: str = ""
    times: list[float] = field(default_factory=list)
    max_repeats: int = 0


# --------------------------------------------------------------------------------------------- peers


def _torch_impls(case: Case, g: torch.Generator) -> list[Impl]:
    out: list[Impl] = []
    if case.kind == "gemm":
        x = torch.randn(case.M, case.K, generator=g)
        w = torch.randn(case.N, case.K, generator=g)
        out.append(Impl("torch_fp32", "", lambda: F.linear(x, w)))
        xi = torch.randint(-128, 128, (case.M, case.K), generator=g, dtype=torch.int8)
        wt = torch.randint(-127, 128, (case.K, case.N), generator=g, dtype=torch.int8)
        out.append(Impl("torch_int_mm", "", lambda: torch._int_mm(xi, wt)))
    else:
        C, H = case.C, case.H
        x = torch.randn(1, C, H, H, generator=g)
        w = torch.randn(C, C, 3, 3, generator=g)
        out.append(Impl("torch_fp32", "", lambda: F.conv2d(x, w, padding=1)))
        xi = torch.randint(-128, 128, (1, C, H, H), generator=g, dtype=torch.int8)
        wt = torch.randint(-127, 128, (C * 9, C), generator=g, dtype=torch.int8)

        def int_mm_conv() -> torch.Tensor:
            cols = F.unfold(xi.to(torch.float32), 3, padding=1)  # [1, C*9, H*W], exact for int8 values
            a = cols[0].t().to(torch.int8).contiguous()
            return torch._int_mm(a, wt).t().reshape(1, C, H, H)

        out.append(Impl("torch_int_mm", "", int_mm_conv))
    try:
        out.append(_torch_ao(case, g))
    except Exception as exc:  # pragma: no cover - depends on the torch build
        print(f"  (torch_ao_int8 unavailable: {exc})")
    return out


def _torch_ao(case: Case, g: torch.Generator) -> Impl:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized as nnq

        engines = torch.backends.quantized.supported_engines
        torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
        if case.kind == "gemm":
            w = torch.randn(case.N, case.K, generator=g)
            mod: Any = nnq.Linear(case.K, case.N, dtype=torch.qint8)
            x = torch.randn(case.M, case.K, generator=g)
            axes: tuple[int, ...] = (1,)
        else:
            C = case.C
            w = torch.randn(C, C, 3, 3, generator=g)
            mod = nnq.Conv2d(C, C, 3, padding=1)
            x = torch.randn(1, C, case.H, case.H, generator=g)
            axes = (1, 2, 3)
        scales = (w.abs().amax(dim=axes) / 127).to(torch.float64)
        qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.int64), 0, torch.qint8)
        mod.set_weight_bias(qw, torch.zeros(w.shape[0]))
        mod.scale, mod.zero_point = 0.05, 128
        xq = torch.quantize_per_tensor(x, 0.03, 128, torch.quint8)
        if case.kind == "conv":
            xq = xq.contiguous(memory_format=torch.channels_last)

    def fn() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mod(xq)

    return Impl("torch_ao_int8", "", fn)


def _onnxruntime(case: Case, threads: int, g: torch.Generator) -> Impl | None:
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None

    def arr(v: Any, name: str) -> Any:
        return numpy_helper.from_array(np.asarray(v), name)

    if case.kind == "gemm":
        w = torch.randint(-127, 128, (case.K, case.N), generator=g, dtype=torch.int8).numpy()
        inits = [arr(w, "w"), arr(np.float32(0.03), "xs"), arr(np.uint8(128), "xz"), arr(np.float32(0.01), "ws"),
                 arr(np.int8(0), "wz"), arr(np.float32(0.05), "ys"), arr(np.uint8(128), "yz")]
        node = helper.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
        xshape, yshape = [case.M, case.K], [case.M, case.N]
    else:
        C, H = case.C, case.H
        w = torch.randint(-127, 128, (C, C, 3, 3), generator=g, dtype=torch.int8).numpy()
        inits = [arr(w, "w"), arr(np.float32(0.03), "xs"), arr(np.uint8(128), "xz"),
                 arr(np.full(C, 0.01, np.float32), "ws"), arr(np.zeros(C, np.int8), "wz"), arr(np.float32(0.05), "ys"),
                 arr(np.uint8(128), "yz"), arr(np.zeros(C, np.int32), "b")]
        node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                                pads=[1, 1, 1, 1], kernel_shape=[3, 3])
        xshape, yshape = [1, C, H, H], [1, C, H, H]
    graph = helper.make_graph([node], "bench", [helper.make_tensor_value_info("x", TensorProto.UINT8, xshape)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, yshape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no spinning into the next impl's time
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = torch.randint(0, 256, tuple(xshape), generator=g, dtype=torch.uint8).numpy()
    return Impl("onnxruntime_int8", "", lambda: sess.run(None, {"x": x}))


# -------------------------------------------------------------------------------------------- lowbit


def _native() -> Any:
    try:
        from lowbit import _native as nat
    except ImportError:
        return None
    return nat


def _set_isa(path: str) -> None:
    try:
        from lowbit.kernels import native as nv

        if nv.available():
            nv.set_isa(path)
            return
    except ImportError:  # pragma: no cover - the int8 wrappers ship with the package
        pass
    nat = _native()
    if nat is not None:
        nat.set_isa_cap(path)


def _set_threads(n: int) -> None:
    try:
        from lowbit.kernels import native as nv

        if nv.available():
            nv.set_num_threads(n)
            return
    except ImportError:  # pragma: no cover
        pass
    nat = _native()
    if nat is not None:
        nat.set_num_threads(n)


def _native_settings() -> tuple[str, int]:
    """The process-wide ISA cap and lowbit's thread count, to restore after a run."""
    nat = _native()
    cap = str(nat.isa_cap()) if hasattr(nat, "isa_cap") else "vnni"
    try:
        from lowbit.kernels import native as nv

        return cap, nv.num_threads()
    except ImportError:  # pragma: no cover
        return cap, int(nat.num_threads())


def _paths(paths: list[str] | None) -> list[str]:
    """The dispatch paths to measure: those this CPU runs under the caps in force (``LOWBIT_ISA``, set_isa,
    the calling thread's ``native.isa`` block)."""
    nat = _native()
    if nat is None:
        return []
    active = str(nat.active_isa())
    if active == "neon":
        avail = ["portable"]  # no NEON paths for these kernels yet: the portable C++ runs
    else:
        avail = [p for p in PATH_ORDER if _RANK[p] <= _RANK.get(active, 0)]
    if paths is not None:
        unknown = [p for p in paths if p not in PATH_ORDER]
        if unknown:
            raise ValueError(f"unknown dispatch path(s) {unknown}; use {', '.join(PATH_ORDER)}")
        avail = [p for p in avail if p in paths]
    return sorted(avail, key=lambda p: -_RANK[p])


def _kernel_name(family: str, path: str) -> str:
    """Kernel the family runs at this ISA cap (to drop caps that run the same kernel as a higher one)."""
    nat = _native()
    prev = str(nat.isa_cap()) if hasattr(nat, "isa_cap") else "vnni"
    _set_isa(path)
    try:
        if family == "int8":
            return str(nat.int8_isa()) if hasattr(nat, "int8_isa") else path
        if family == "w46":
            return str(nat.w46_path())
        if family.startswith("bm"):
            return str(nat.bm_path()) if hasattr(nat, "bm_path") else ""
        return str(nat.binary_path())
    finally:
        _set_isa(prev)


def _lowbit_impls(case: Case, paths: list[str], g: torch.Generator) -> list[Impl]:
    from lowbit.kernels import PackedInt8, Requant, int8_conv2d, int8_linear
    from lowbit.kernels.binary import Threshold, binary_conv2d, binary_linear, pack_binary, pack_bits
    from lowbit.kernels.w46 import pack_w46, w46_conv2d, w46_linear

    N = case.N
    m0 = torch.randint(2**30, 2**31 - 1, (N,), generator=g, dtype=torch.int32)
    rshift = torch.randint(36, 44, (N,), generator=g, dtype=torch.int32)
    K_x, K_w = 14, 9  # (N_x, N_w) = (29, 19)
    thr = torch.randint(-8, 8, (N,), generator=g, dtype=torch.int32)
    if case.kind == "gemm":
        xq = torch.randint(0, 256, (case.M, case.K), generator=g, dtype=torch.uint8)
        w8 = torch.randint(-127, 128, (N, case.K), generator=g, dtype=torch.int8)
        x46 = torch.randint(0, 2 * K_x + 1, (case.M, case.K), generator=g, dtype=torch.uint8)
        w46 = torch.randint(-K_w, K_w + 1, (N, case.K), generator=g, dtype=torch.int8)
        xs = torch.rand(case.M, case.K, generator=g) > 0.5
        ws = torch.rand(N, case.K, generator=g) > 0.5
    else:
        C, H = case.C, case.H
        xq = torch.randint(0, 256, (1, C, H, H), generator=g, dtype=torch.uint8)
        w8 = torch.randint(-127, 128, (C, C, 3, 3), generator=g, dtype=torch.int8)
        x46 = torch.randint(0, 2 * K_x + 1, (1, C, H, H), generator=g, dtype=torch.uint8)
        w46 = torch.randint(-K_w, K_w + 1, (C, C, 3, 3), generator=g, dtype=torch.int8)
        xs = torch.rand(1, H, H, C, generator=g) > 0.5  # channel-packed NHWC words once packed
        ws = torch.rand(C, C, 3, 3, generator=g) > 0.5

    # Every (family, path) gets its own copies of the operands, so that no row of the round-robin runs
    # on caches warmed by the row before it.
    def make(family: str) -> Callable[[], Any]:
        req = Requant(m0.clone(), rshift.clone(), 3, 0, 255)
        if family == "int8":
            x, w = xq.clone(), PackedInt8(w8.clone())
            if case.kind == "gemm":
                return lambda: int8_linear(x, 128, w, None, req)
            return lambda: int8_conv2d(x, 128, w, None, req, (1, 1), (1, 1))
        if family == "w46":
            x, w = x46.clone(), pack_w46(w46.clone(), K_x, K_w)
            if case.kind == "gemm":
                return lambda: w46_linear(x, w, None, req)
            return lambda: w46_conv2d(x, w, None, req, 1, 1)
        if family.startswith("bm"):
            from lowbit.bm.bench import bm_kernel_fn

            return bm_kernel_fn(case, int(family[2:]), g)
        x, w, t = pack_bits(xs), pack_binary(ws), Threshold(thr.clone())
        if case.kind == "gemm":
            return lambda: binary_linear(x, w, t)
        return lambda: binary_conv2d(x, w, t, 1, 1)

    out: list[Impl] = []
    for family in ("int8", "w46", "binary", "bm8", "bm16"):
        seen: set[str] = set()
        for path in paths:
            kname = _kernel_name(family, path)
            if kname in seen or not kname:
                continue
            seen.add(kname)
            out.append(Impl(f"lowbit_{family}", path, make(family), setup=lambda p=path: _set_isa(p), kernel=kname))
    return out


# ----------------------------------------------------------------------------------------- measuring


def _measure(impls: list[Impl], repeats: int, warmup: int, budget_s: float) -> None:
    """Warm up every implementation, then time them round-robin; slow ones stop after their budget."""
    for im in impls:
        im.setup()
        t_last = 0.0
        spent = 0.0
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            im.fn()
            t_last = time.perf_counter() - t0
            spent += t_last
            if spent > budget_s / 2:
                break
        im.max_repeats = max(3, min(repeats, int(budget_s / max(t_last, 1e-9))))
    rng = random.Random(0)
    order = list(impls)
    for _ in range(max(im.max_repeats for im in impls)):
        rng.shuffle(order)  # a fresh order each round: no implementation always follows the same one
        for im in order:
            if len(im.times) >= im.max_repeats:
                continue
            im.setup()
            t0 = time.perf_counter()
            im.fn()
            im.times.append(time.perf_counter() - t0)


def run(
    threads: int = 1,
    json_path: str | None = None,
    repeats: int = 20,
    warmup: int = 3,
    quick: bool = False,
    paths: list[str] | None = None,
    impls: list[str] | None = None,
) -> list[dict]:
    """Run the kernel benchmark; print a table and return (and optionally write as JSON) the records.

    Records: ``case`` (``gemm_MxNxK``, ``conv_HxW_C``), ``impl``, ``path`` (lowbit dispatch path, empty for
    peers), ``threads``, ``median_ms``, ``gops`` (2*M*N*K / median), plus ``repeats``, ``kernel`` (the native
    kernel that ran), ``vs_torch_fp32`` and ``vs_torch_int8`` (speed-up over torch_fp32 and over the faster
    of torch_int_mm / torch_ao_int8) and ``vs_lowbit_int8`` (speed-up over ``lowbit_int8`` at the same
    ISA cap; None for peers or when that row is not measured). ``quick``: small shapes and few repeats (a
    smoke test). ``paths``: restrict the lowbit dispatch paths (never above ``LOWBIT_ISA``). ``impls``:
    measure only these implementations (names as in :data:`IMPLS`).
    """
    threads = int(threads)
    if threads < 1:
        raise ValueError("threads must be >= 1")
    if impls is not None and (not impls or set(impls) - set(IMPLS)):
        raise ValueError(f"unknown implementation(s) {sorted(set(impls) - set(IMPLS)) or impls}; use "
                         f"{', '.join(IMPLS)}")
    only = None if impls is None else set(impls)
    if json_path:
        files.check_output(json_path)  # before minutes of measuring
    cases = QUICK_CASES if quick else CASES
    if quick:
        repeats, warmup = min(repeats, 3), min(warmup, 1)
    budget = 0.3 if quick else 3.0
    lb_paths = _paths(paths)
    int8_kernel = {p: _kernel_name("int8", p) for p in lb_paths}  # the int8 kernel each cap runs
    prev_cap, prev_threads = _native_settings() if lb_paths else ("vnni", 0)
    prev_torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    if lb_paths:
        _set_threads(threads)
    records: list[dict] = []
    try:
        for ci, case in enumerate(cases):
            g = torch.Generator().manual_seed(1234 + ci)
            impls = _torch_impls(case, g)
            ort_impl = _onnxruntime(case, threads, g)
            if ort_impl is not None:
                impls.append(ort_impl)
            impls += _lowbit_impls(case, lb_paths, g) if lb_paths else []
            if only is not None:
                impls = [im for im in impls if im.impl in only]
            _measure(impls, repeats, warmup, budget)
            med = {id(im): statistics.median(im.times) for im in impls}
            t_fp32 = next((med[id(im)] for im in impls if im.impl == "torch_fp32"), math.nan)
            t_int8 = min((med[id(im)] for im in impls if im.impl in ("torch_int_mm", "torch_ao_int8")),
                         default=math.nan)
            lb_int8 = {im.kernel: med[id(im)] for im in impls if im.impl == "lowbit_int8"}
            for im in impls:
                t = med[id(im)]
                records.append({
                    "case": case.name,
                    "impl": im.impl,
                    "path": im.path,
                    "threads": threads,
                    "median_ms": t * 1e3,
                    "gops": case.ops / t / 1e9,
                    "repeats": len(im.times),
                    "kernel": im.kernel,
                    "vs_torch_fp32": t_fp32 / t,
                    "vs_torch_int8": t_int8 / t,
                    "vs_lowbit_int8": lb_int8[int8_kernel[im.path]] / t
                    if im.path and int8_kernel[im.path] in lb_int8 else None,
                })
    finally:
        torch.set_num_threads(prev_torch_threads)
        if lb_paths:
            _set_isa(prev_cap)
            _set_threads(prev_threads)
    _print_table(records)
    if json_path:
        files.write_text(json_path, json.dumps(records, indent=1))
    return records


def _ratio(v: float | None, width: int = 9) -> str:
    """A speed-up column; ``-`` where there is nothing to compare with (NaN / None)."""
    return f"{'-':>{width}s}" if v is None or math.isnan(v) else f"{v:{width}.2f}"


def _print_table(records: list[dict]) -> None:
    head = (f"{'case':22s} {'impl':17s} {'path':9s} {'median ms':>10s} {'GOP/s':>9s} {'x fp32':>8s} {'x t-int8':>9s} "
            f"{'x lb-int8':>9s}")
    print(head)
    print("-" * len(head))
    last = None
    for r in records:
        if last is not None and r["case"] != last:
            print()
        last = r["case"]
        print(f"{r['case']:22s} {r['impl']:17s} {r['path']:9s} {r['median_ms']:10.3f} {r['gops']:9.1f} "
              f"{_ratio(r['vs_torch_fp32'], 8)} {_ratio(r['vs_torch_int8'])} {_ratio(r['vs_lowbit_int8'])}")
    if records:
        print(f"\n(threads: {records[0]['threads']}; median of interleaved repeats; GOP/s = 2*M*N*K / time; "
              "x fp32 / x t-int8 / x lb-int8: speed-up over torch_fp32 / the faster torch int8 path / lowbit_int8 "
              "at the same ISA cap)")
