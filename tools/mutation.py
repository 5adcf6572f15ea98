"""Mutation check: break lowbit on purpose, one way at a time, and show that the test suite notices.

Each mutation is an exact text replacement in one file (it must match exactly once, so the script fails
loudly when the code it targets moves). The tree (tracked and untracked, not ignored files, plus the
built extension) is copied to a temporary directory; for each mutation the file is changed there, the
extension is rebuilt when the mutation touches what it is built from, the relevant tests run against the
copy (``PYTHONPATH`` puts the copy's ``src`` first), and the file is restored. A mutation is *caught* when
those tests fail. Before any mutation the same tests must pass on the unmodified copy.

    .venv/bin/python tools/mutation.py            # all mutations (~15 min on 2 busy cores)
    .venv/bin/python tools/mutation.py -k dynamic # only those whose name contains "dynamic"
    .venv/bin/python tools/mutation.py --list

Exit status 0 when every mutation is caught. Not collected by pytest (it lives outside tests/).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str

    @property
    def native(self) -> bool:
        """Changes what the extension is built from (csrc/*.cpp, *.h), so the copy needs a rebuild. The
        emulation harnesses (tests/test_emulation.py) compile their own copies of the files they use."""
        return self.path.startswith("csrc/") and not self.tests == ("tests/test_emulation.py",)


EXACT = "tests/test_exact_models.py"
RUNTIME = "tests/test_native_runtime.py"

MUTATIONS = [
    Mutation(
        "per-tensor weight scales", "src/lowbit/methods/common.py",
        "obs = make_observer(settings.weight_observer, axis=0 if isinstance(g, PerAxis) else None)",
        "obs = make_observer(settings.weight_observer, axis=None)",
        ("tests/test_nn_ops.py", EXACT), "per-channel weight scales replaced by one per-tensor scale (issue 7)",
    ),
    Mutation(
        "dynamic input zero point + 2", "src/lowbit/nn/layers.py",
        "        xq = quantize(x, s, z, UINT8_ACT)",
        "        xq = quantize(x, s, z + 2, UINT8_ACT)",
        (EXACT,), "dynamic layers quantize with zp + 2 while the kernel subtracts zp (issue 7)",
    ),
    Mutation(
        "residual add rounds down", "src/lowbit/kernels/reference.py",
        "out = torch.bitwise_right_shift(acc + (1 << (int(rshift) - 1)), int(rshift)) + int(out_zp)",
        "out = torch.bitwise_right_shift(acc, int(rshift)) + int(out_zp)",
        ("tests/test_nn_ops.py",), "residual-add rounding half up -> floor (issue 7)",
    ),
    Mutation(
        "static output zero point + 3", "src/lowbit/methods/integer_graph.py",
        "    return QConv(lq.weight, ws, bq, in_spec, out_spec,",
        "    out_spec = QSpec.per_tensor(out_spec.format, out_spec.scale[0], out_spec.zero_point[0] + 3)\n"
        "    return QConv(lq.weight, ws, bq, in_spec, out_spec,",
        (EXACT,), "static layers' output zero point off by 3 (issue 7)",
    ),
    Mutation(
        "requantize rounds down", "src/lowbit/formats/affine.py",
        "v = acc.to(torch.int64) * m + torch.bitwise_left_shift(torch.ones_like(r), r - 1)",
        "v = acc.to(torch.int64) * m",
        ("tests/test_formats.py", "tests/test_nn_ops.py"), "reference requantization without its rounding term",
    ),
    Mutation(
        "avg pool rounds down", "src/lowbit/nn/ops.py",
        'return torch.div(s + torch.div(n, 2, rounding_mode="floor"), n, rounding_mode="floor")',
        'return torch.div(s, n, rounding_mode="floor")',
        ("tests/test_nn_ops.py",), "integer average pooling truncates instead of rounding half up",
    ),
    Mutation(
        "dynamic qparams round half up", "src/lowbit/formats/affine.py",
        "zp = float(min(max(round(qmin - lo / max(scale, eps)), qmin), qmax))",
        "zp = float(min(max(math.floor(qmin - lo / max(scale, eps) + 0.5), qmin), qmax))",
        ("tests/test_nn_ops.py",), "per-call zero point rounded half up, unlike calibration's half to even",
    ),
    Mutation(
        "clashing epilogue numbers", "src/lowbit/kernels/epilogue.py",
        'EPI_KIND = {"none": 0, "float_out": 1, "requant_u8": 2, "requant_s8": 3, "bits": 4}',
        'EPI_KIND = {"none": 0, "float_out": 3, "requant_u8": 1, "requant_s8": 2, "bits": 4}',
        (RUNTIME, "tests/test_kernels_int8.py"), "Python and C++ disagree on the epilogue kinds (int8's old enum)",
    ),
    Mutation(
        "binary reference bit order", "src/lowbit/kernels/binary.py",
        "    return (bb * _POW2).sum(-1)  # distinct powers",
        "    return (bb * _POW2.flip(0)).sum(-1)  # distinct powers",
        ("tests/test_kernels_binary.py",), "the pure-PyTorch bit packing of the reference / fallback is reversed",
    ),
    Mutation(
        "no accumulator bound", "src/lowbit/kernels/__init__.py",
        "        if self.acc_bound.numel() and int(self.acc_bound.max()) > INT32_MAX:",
        "        if False:",
        (RUNTIME,), "int8 weights whose accumulator can overflow are accepted (torch backend wraps)",
    ),
    Mutation(
        "per-tensor Requant rejected", "src/lowbit/kernels/native.py",
        "        m0v, rsv = epi.per_channel(n)  # per-tensor parameters repeated per channel",
        "        m0v, rsv = epi.m0, epi.rshift",
        ("tests/test_kernels_int8.py",), "the native int8 path refuses one multiplier for all channels (issue 7)",
    ),
    Mutation(
        "evaluate keeps thread count", "src/lowbit/evaluate.py",
        "        if nat is not None and old_nat is not None:\n            nat.set_num_threads(old_nat)\n",
        "",
        (RUNTIME,), "measure_latency leaves lowbit's thread count changed (issue 7)",
    ),
    Mutation(
        "KL without clipped mass", "src/lowbit/observers/kl.py",
        "    p[-1] += hist[stop:].sum()\n",
        "",
        ("tests/test_observers.py",), "KL's reference distribution forgets the mass clipped above the window",
    ),
    Mutation(
        "w46 flush one step late", "csrc/w46.cpp",
        "static int flush_interval(int K_x, int K_w) { return 32767 / (4 * K_x * K_w); }",
        "static int flush_interval(int K_x, int K_w) { return 32767 / (4 * K_x * K_w) + 1; }",
        ("tests/test_emulation.py",), "4.6-bit int16 accumulators widened one step too late (AVX-512 paths, emulated)",
    ),
    Mutation(
        "pool without exception capture", "csrc/parallel.cpp",
        "            try {\n                (*task)(c);\n            } catch (...) {",
        "            try {\n                (*task)(c);\n            } catch (int) {",
        (RUNTIME,), "a chunk's runtime_error / bad_alloc escapes the pool (std::terminate on a worker)",
    ),
    Mutation(
        "pool not reset after fork", "csrc/parallel.cpp",
        "void atfork_child() {\n    g_pool = nullptr;\n",
        "void atfork_child() {\n",
        (RUNTIME,), "a forked child keeps the parent's pool, whose workers do not exist there (issue 7)",
    ),
]


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        src = ROOT / f.decode()
        if src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())
    for so in glob.glob(str(ROOT / "src" / "lowbit" / "_native*")):
        shutil.copy2(so, dst / "src" / "lowbit" / Path(so).name)


def _env(copy: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(copy / "src"), "PYTHONDONTWRITEBYTECODE": "1"}


def _save_extension(copy: Path) -> dict[Path, bytes]:
    return {Path(p): Path(p).read_bytes() for p in glob.glob(str(copy / "src" / "lowbit" / "_native*"))}


def _rebuild(copy: Path) -> None:
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "-j", "2"], cwd=copy,
                         env=_env(copy), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"rebuild failed:\n{res.stderr[-3000:]}")


def _pytest(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    """(passed, last lines of output). A timeout counts as a failure (a hang is caught too)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *tests]
    try:
        res = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    tail = [ln for ln in res.stdout.strip().splitlines() if ln.strip()][-1:] or [res.stderr.strip()[-200:]]
    return res.returncode == 0, tail[0]


def _apply(copy: Path, m: Mutation) -> str:
    p = copy / m.path
    text = p.read_text()
    n = text.count(m.old)
    if n != 1:
        raise RuntimeError(f"mutation {m.name!r}: the target text occurs {n} times in {m.path} (expected once)")
    p.write_text(text.replace(m.old, m.new))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only mutations whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (a hang counts as caught)")
    args = ap.parse_args(argv)
    todo = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in todo:
            print(f"{m.name:34s} {m.path:40s} {m.why}")
        return 0
    if not todo:
        print(f"no mutation matches {args.k!r}", file=sys.stderr)
        return 2
    for m in todo:  # every target must still be where the mutation expects it, before anything runs
        n = (ROOT / m.path).read_text().count(m.old)
        if n != 1:
            print(f"mutation {m.name!r}: its target occurs {n} times in {m.path} (expected once)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="lowbit-mutation-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        tests = tuple(sorted({t for m in todo for t in m.tests}))
        t0 = time.monotonic()
        ok, tail = _pytest(copy, tests, args.timeout)
        print(f"baseline (unmodified copy): {'pass' if ok else 'FAIL'} in {time.monotonic() - t0:.0f} s: {tail}")
        if not ok:
            return 2
        rows = []
        for m in todo:
            t0 = time.monotonic()
            original = _apply(copy, m)
            saved = _save_extension(copy) if m.native else {}
            try:
                if m.native:
                    _rebuild(copy)
                passed, tail = _pytest(copy, m.tests, args.timeout)
            finally:
                (copy / m.path).write_text(original)
                for path, data in saved.items():  # the unmodified build back
                    path.write_bytes(data)
            rows.append((m, not passed, time.monotonic() - t0, tail))
            print(f"{'caught' if not passed else 'NOT CAUGHT':10s} {m.name:34s} {time.monotonic() - t0:6.0f} s  {tail}",
                  flush=True)
    print()
    print("| mutation | file | what it breaks | tests run | result |")
    print("|---|---|---|---|---|")
    for m, caught, secs, _ in rows:
        tests = ", ".join(Path(t).name for t in m.tests)
        verdict = "caught" if caught else "**not caught**"
        print(f"| {m.name} | `{m.path}` | {m.why} | {tests} | {verdict} ({secs:.0f} s) |")
    missed = [m.name for m, caught, _, _ in rows if not caught]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
