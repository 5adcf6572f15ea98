"""``lowbit bench models``: whole networks, lowbit against torch and ONNX Runtime, batch 1, on this CPU.

Networks (:mod:`lowbit.bench.nets`): ResNet-18 and MobileNetV2 at 224x224, resnet20 and mobilenet at
32x32, random weights with re-estimated BatchNorm statistics. Implementations:

- ``torch_fp32``: the float model, eval mode, ``torch.inference_mode()``.
- ``torch_ao_int8``: torch.ao FX graph mode, x86 engine (``prepare_fx`` with the default x86 qconfig
  mapping, calibration, ``convert_fx``).
- ``ort_fp32`` / ``ort_int8``: ONNX Runtime on the exported model (opset 17); int8 is ``quantize_static``
  in QDQ format, per-channel int8 weights, uint8 activations, MinMax calibration. Sessions:
  ``intra_op_num_threads`` = threads, sequential, all graph optimizations, and
  ``session.force_spinning_stop=1`` (else ORT's workers spin after each run into everyone else's time).
- ``lowbit_static`` / ``lowbit_dynamic``: ``lowbit.quantize(model, "static" | "dynamic", calib)``.
- ``lowbit_w8`` / ``lowbit_w46`` (not in the default set; ``--impls``): the 8-bit (256 x 256 levels, int8
  kernels) and 4.6-bit (25 x 21 levels, 4.6-bit kernels where dispatch picks them) models of the w46
  pipeline, plain rounding (``correction_steps=0``: the pipeline's later stages change weights, not speed).

The int8 candidates calibrate on the same random inputs. Method: every candidate is warmed up, then
timed in rounds in which each runs once, in an order rotated every round; the median of the rounds is
one repeat; the figure is the median of ``repeats`` repeats, with their spread ((max - min) / median).
Output agreement: relative L2 error of the logits against torch fp32 over a few fresh inputs.

Threads: ``torch.set_num_threads``, lowbit's pool and ORT's ``intra_op_num_threads`` are all set to the
thread count. torch's OpenMP workers spin for a while after every parallel region; on a machine with
as many cores as threads they would steal the next candidate's cores, so every timed call is followed
by a short pause (``settle_ms``) in which spinning workers go to sleep; the pause is not timed.
The load of the machine (the CPU share other processes used while the timing ran) is reported with
the results: figures taken on a busy machine are noisy, ratios within a round are still fair.

AVX2-level comparisons on an AVX-512 machine: ``LOWBIT_ISA=avx2`` caps lowbit,
``FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` cap torch (set
before the process starts); ONNX Runtime cannot be capped. The caps in effect are printed and recorded.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit import files

from .nets import NETS, make_net

__all__ = ["run", "peer_runners", "IMPLS", "DEFAULT_IMPLS", "MODELS", "QUICK_MODELS"]

DEFAULT_IMPLS = ("torch_fp32", "torch_ao_int8", "ort_fp32", "ort_int8", "lowbit_static", "lowbit_dynamic")
IMPLS = (*DEFAULT_IMPLS, "lowbit_w8", "lowbit_w46")
MODELS = ("resnet18", "mobilenetv2", "resnet20", "mobilenet")
QUICK_MODELS = ("resnet20",)
INT8_PEERS = ("torch_ao_int8", "ort_int8")


@dataclass
class Candidate:
    impl: str
    fn: Callable[[torch.Tensor], Any]  # one batch-1 forward; returns something convertible to a tensor
    to_tensor: Callable[[Any], torch.Tensor] = lambda y: y
    times: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------ building peers


def _torch_ao(model: nn.Module, calib: list[torch.Tensor], x: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        engines = torch.backends.quantized.supported_engines
        engine = "x86" if "x86" in engines else "fbgemm"
        torch.backends.quantized.engine = engine
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine), (x,))
        with torch.inference_mode():
            for c in calib:
                prepared(c)
        q = convert_fx(prepared)
    return q


def _onnx_export(model: nn.Module, x: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:  # the TorchScript exporter is fast and enough for these static CNNs
            torch.onnx.export(model, (x,), path, opset_version=17, input_names=["x"], output_names=["y"],
                              dynamo=False)
        except Exception:  # pragma: no cover - depends on the torch version
            torch.onnx.export(model, (x,), path, opset_version=17, input_names=["x"], output_names=["y"])


def _ort_int8_model(fp32_path: str, calib: list[torch.Tensor], out_path: str) -> None:
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": c[i:i + 1].numpy()} for c in calib for i in range(c.shape[0])])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's quantizer logs advice through the root logger
    try:
        quantize_static(fp32_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        root.setLevel(level)


def _ort_session(path: str, threads: int) -> Callable[[torch.Tensor], Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3  # errors only (ORT warns about every unused constant it folds away)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x.numpy()})[0]


#: Options of the lowbit candidates beyond the calibration data.
_LOWBIT_OPTIONS: dict[str, dict[str, Any]] = {
    "static": {"progress": False}, "dynamic": {},
    "w8": {"correction_steps": 0, "progress": False}, "w46": {"correction_steps": 0, "progress": False},
}


def _lowbit(model: nn.Module, method: str, calib: list[torch.Tensor], x: torch.Tensor) -> nn.Module:
    from lowbit.methods.api import quantize

    return quantize(model, method, torch.cat(calib), example_input=x, **_LOWBIT_OPTIONS[method])


def _build(model: nn.Module, impls: list[str], calib: list[torch.Tensor], x: torch.Tensor, workdir: str,
           notes: list[str]) -> dict[str, Any]:
    """Everything that does not depend on the thread count: quantized modules, ONNX files."""
    built: dict[str, Any] = {}
    for impl in impls:
        try:
            if impl == "torch_fp32":
                built[impl] = model
            elif impl == "torch_ao_int8":
                built[impl] = _torch_ao(model, calib, x)
            elif impl in ("ort_fp32", "ort_int8"):
                fp32 = os.path.join(workdir, "model.onnx")
                if not os.path.exists(fp32):
                    _onnx_export(model, x, fp32)
                if impl == "ort_fp32":
                    built[impl] = fp32
                else:
                    q = os.path.join(workdir, "model_int8.onnx")
                    _ort_int8_model(fp32, calib, q)
                    built[impl] = q
            elif impl.startswith("lowbit_"):
                built[impl] = _lowbit(model, impl.removeprefix("lowbit_"), calib, x)
        except ImportError as e:
            notes.append(f"{impl} skipped: {e}")
        except Exception as e:  # a peer failing to build must not hide the others
            notes.append(f"{impl} failed to build: {type(e).__name__}: {e}")
    return built


def _candidates(built: dict[str, Any], threads: int) -> list[Candidate]:
    out = []
    for impl, obj in built.items():
        if impl.startswith("ort_"):
            fn = _ort_session(obj, threads)
            out.append(Candidate(impl, fn, lambda y: torch.from_numpy(y)))
        else:
            out.append(Candidate(impl, obj))
    return out


def peer_runners(model: nn.Module, impls: list[str], calib: list[torch.Tensor], x: torch.Tensor, workdir: str,
                 threads: int, notes: list[str]) -> dict[str, Callable[[torch.Tensor], Any]]:
    """One batch-1 forward per implementation of ``impls`` (names of :data:`IMPLS`) built for ``model``, for
    callers that time them beside their own candidates (ORT sessions use ``threads``; the caller sets
    torch's and lowbit's). ``calib``: calibration batches; ``workdir``: where the ONNX files go. A peer that
    cannot be built is left out with a line in ``notes``."""
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise ValueError(f"unknown implementation(s) {bad}; choose from {', '.join(IMPLS)}")
    return {c.impl: c.fn for c in _candidates(_build(model, impls, calib, x, workdir, notes), threads)}


# ---------------------------------------------------------------------------------------- measuring


class _Load:
    """CPU share used by other processes between start() and stop(), from /proc/stat and our rusage."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._t = self._busy = self._self = 0.0

    @staticmethod
    def _stat() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [float(t) for t in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0.0)
        return (sum(v) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def start(self) -> None:
        self._t, self._busy, self._self = time.perf_counter(), self._stat() or 0.0, self._own()

    def stop(self) -> None:
        busy = self._stat()
        if busy is None:
            return
        dt = time.perf_counter() - self._t
        other = (busy - self._busy) - (self._own() - self._self)
        ncpu = os.cpu_count() or 1
        if dt > 0:
            self.samples.append(max(0.0, other) / (dt * ncpu))

    def wait_quiet(self, max_wait_s: float, threshold: float = 0.10, window_s: float = 0.5) -> float:
        """Sleep in windows of `window_s` until other processes use < `threshold` of the CPU (at most
        `max_wait_s`); returns the share in the last window (nan if it cannot be measured)."""
        share = math.nan
        deadline = time.perf_counter() + max_wait_s
        while True:
            probe = _Load()
            probe.start()
            time.sleep(window_s)
            probe.stop()
            if not probe.samples:
                return math.nan
            share = probe.samples[0]
            if share < threshold or time.perf_counter() >= deadline:
                return share

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else math.nan


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    from lowbit.kernels import native

    prev = torch.get_num_threads()
    prev_lb = native.num_threads() if native.available() else None
    torch.set_num_threads(n)
    if native.available():
        native.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
        if prev_lb is not None:
            native.set_num_threads(prev_lb)


def _time_rounds(cands: list[Candidate], x: torch.Tensor, rounds: int, settle_s: float) -> dict[str, float]:
    """One repeat: `rounds` rounds, each candidate once per round, order rotated; median per candidate."""
    times: dict[str, list[float]] = {c.impl: [] for c in cands}
    n = len(cands)
    for r in range(rounds):
        for i in range(n):
            c = cands[(i + r) % n]
            t0 = time.perf_counter()
            c.fn(x)
            times[c.impl].append(time.perf_counter() - t0)
            if settle_s > 0:
                time.sleep(settle_s)
    return {k: statistics.median(v) for k, v in times.items()}


def _rel_l2(cands: list[Candidate], inputs: list[torch.Tensor]) -> dict[str, float]:
    outs = {c.impl: [c.to_tensor(c.fn(x)).float().reshape(-1) for x in inputs] for c in cands}
    if "torch_fp32" not in outs:
        return {}
    ref = outs["torch_fp32"]
    num = {k: sum(float((a - b).pow(2).sum()) for a, b in zip(v, ref, strict=True)) for k, v in outs.items()}
    den = sum(float(b.pow(2).sum()) for b in ref)
    return {k: math.sqrt(v / den) if den > 0 else math.nan for k, v in num.items()}


def _warmup(cands: list[Candidate], x: torch.Tensor, budget_s: float, max_calls: int) -> int:
    """Warm every candidate; returns how many rounds fit the budget (at least 3)."""
    slowest = 0.0
    for c in cands:
        t = 0.0
        for _ in range(max_calls):
            t0 = time.perf_counter()
            c.fn(x)
            t = time.perf_counter() - t0
        slowest += t
    return max(3, int(budget_s / max(slowest, 1e-9)))


#: Environment switches that cap the peers' instruction sets (read by the libraries at load time), for
#: comparisons on the AVX2 level of an AVX-512 machine. ONNX Runtime's MLAS has no such switch.
PEER_ISA_SWITCHES = ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def isa_caps() -> str:
    """The instruction-set caps in effect for lowbit and the peers, in words ('' if none)."""
    caps = [f"{k}={os.environ[k]}" for k in ("LOWBIT_ISA", *PEER_ISA_SWITCHES) if os.environ.get(k)]
    if not caps:
        return ""
    return "ISA caps: " + ", ".join(caps) + " (ONNX Runtime cannot be capped: it uses the best ISA)"


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from lowbit import _native

        feats = [k for k, v in _native.cpu_features().items() if v and k.startswith("avx")]
        return f"{name} ({os.cpu_count()} logical CPUs; {', '.join(feats)}; lowbit int8 path {_native.int8_isa()})"
    except ImportError:
        return f"{name} ({os.cpu_count()} logical CPUs)"


def run(
    models: list[str] | None = None,
    impls: list[str] | None = None,
    threads: list[int] | None = None,
    repeats: int = 3,
    rounds: int | None = None,
    budget_s: float = 6.0,
    settle_ms: float = 2.0,
    calib_samples: int = 16,
    quiet_wait_s: float = 30.0,
    json_path: str | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the whole-model benchmark; print the table and return the records (also written as JSON).

    Records: ``model``, ``impl``, ``threads``, ``median_ms`` (median over repeats of the per-repeat
    medians), ``spread`` ((max - min) / median of the repeat medians), ``rel_l2`` (output agreement with
    torch fp32), ``rounds``, ``repeats``, ``cpu``, ``load`` (mean CPU share of other processes).
    ``quiet_wait_s``: before each repeat, wait up to this long for other processes to use < 10% of the
    CPU. ``quick``: resnet20 only, few rounds, no waiting (a smoke test).
    """
    models = list(models or (QUICK_MODELS if quick else MODELS))
    impls = list(impls or DEFAULT_IMPLS)
    threads = [int(t) for t in (threads or [1])]
    bad = [m for m in models if m not in NETS]
    if bad:
        raise ValueError(f"unknown model(s) {bad}; choose from {', '.join(NETS)}")
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise ValueError(f"unknown implementation(s) {bad}; choose from {', '.join(IMPLS)}")
    if any(t < 1 for t in threads):
        raise ValueError("thread counts must be >= 1")
    if repeats < 1 or (rounds is not None and rounds < 1):
        raise ValueError("repeats and rounds must be >= 1")
    if quick:
        repeats, budget_s, calib_samples, quiet_wait_s = min(repeats, 2), min(budget_s, 0.3), min(calib_samples, 4), 0.0
    if json_path:
        files.check_output(json_path)  # before minutes of measuring
    cpu = cpu_description()
    caps = isa_caps()
    print(f"lowbit bench models: batch 1, {cpu}" + (f"; {caps}" if caps else ""), flush=True)
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    with contextlib.suppress(RuntimeError):  # only possible before the first parallel region
        torch.set_num_interop_threads(1)
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        for mi, name in enumerate(models):
            model, size = make_net(name, seed=seed)
            g = torch.Generator().manual_seed(seed + 100 + mi)
            calib = [torch.randn(1, 3, size, size, generator=g) for _ in range(calib_samples)]
            x = torch.randn(1, 3, size, size, generator=g)
            agree_inputs = [torch.randn(1, 3, size, size, generator=g) for _ in range(2 if quick else 4)]
            wd = os.path.join(tmp, name)
            os.makedirs(wd)
            if progress:
                print(f"  {name}: building {', '.join(impls)} ...", flush=True)
            built = _build(model, impls, calib, x, wd, notes)
            for t in threads:
                with _threads(t), torch.inference_mode():
                    cands = _candidates(built, t)
                    agree = _rel_l2(cands, agree_inputs)
                    n_rounds = rounds or _warmup(cands, x, budget_s / max(repeats, 1), 2 if quick else 5)
                    if rounds:
                        _warmup(cands, x, 0.0, 2 if quick else 5)
                    load = _Load()
                    per_rep: dict[str, list[float]] = {c.impl: [] for c in cands}
                    for _ in range(repeats):
                        if quiet_wait_s > 0:
                            load.wait_quiet(quiet_wait_s)
                        load.start()
                        med = _time_rounds(cands, x, n_rounds, settle_ms / 1e3)
                        load.stop()
                        for k, v in med.items():
                            per_rep[k].append(v)
                for c in cands:
                    reps = per_rep[c.impl]
                    m = statistics.median(reps)
                    records.append({
                        "model": name, "impl": c.impl, "threads": t, "median_ms": m * 1e3,
                        "spread": (max(reps) - min(reps)) / m if m > 0 else math.nan,
                        "rel_l2": agree.get(c.impl, math.nan), "rounds": n_rounds, "repeats": repeats,
                        "cpu": cpu, "isa_caps": caps, "load": load.mean,
                    })
                if progress:
                    print(f"  {name} @ {t} thread(s): {n_rounds} rounds x {repeats} repeats, "
                          f"other processes used {100 * load.mean:.0f}% of the CPU", flush=True)
    print()
    print(format_table(records))
    for n in notes:
        print(f"note: {n}")
    if json_path:
        files.write_text(json_path, json.dumps(records, indent=1))
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """One block per (model, threads): time, spread, speed-up over torch fp32 and agreement; then the
    ratio of lowbit static to the faster int8 peer (> 1: lowbit is faster)."""
    head = (f"{'model':12s} {'thr':>3s} {'impl':15s} {'median ms':>10s} {'spread':>7s} {'x fp32':>7s} "
            f"{'rel L2 vs fp32':>15s}")
    lines = [head, "-" * len(head)]
    keys = list(dict.fromkeys((r["model"], r["threads"]) for r in records))
    for model, t in keys:
        rows = [r for r in records if r["model"] == model and r["threads"] == t]
        by = {r["impl"]: r for r in rows}
        fp32 = by.get("torch_fp32", {}).get("median_ms", math.nan)
        for r in rows:
            x32 = f"{fp32 / r['median_ms']:7.2f}" if not math.isnan(fp32) else f"{'-':>7s}"
            l2 = f"{r['rel_l2']:15.4f}" if not math.isnan(r["rel_l2"]) else f"{'-':>15s}"
            lines.append(f"{model:12s} {t:3d} {r['impl']:15s} {r['median_ms']:10.3f} {100 * r['spread']:6.1f}% "
                         f"{x32} {l2}")
        peers = [by[p]["median_ms"] for p in INT8_PEERS if p in by]
        if peers and "lowbit_static" in by:
            ratio = min(peers) / by["lowbit_static"]["median_ms"]
            lines.append(f"{'':16s} lowbit_static vs the faster int8 peer: {ratio:.2f}x")
        if "lowbit_w46" in by and "lowbit_w8" in by:
            ratio = by["lowbit_w8"]["median_ms"] / by["lowbit_w46"]["median_ms"]
            lines.append(f"{'':16s} lowbit_w46 vs lowbit_w8: {ratio:.2f}x")
        lines.append("")
    loads = [r["load"] for r in records if not math.isnan(r["load"])]
    if loads:
        lines.append(f"(batch 1; median of {records[0]['repeats']} repeats of interleaved rounds; spread = "
                     f"(max - min) / median of the repeats; other processes used "
                     f"{100 * statistics.fmean(loads):.0f}% of the CPU on average while timing)")
    return "\n".join(lines)
