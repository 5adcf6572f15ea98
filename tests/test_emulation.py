"""The AVX-512 kernel paths (int8 VNNI; 4.6-bit AVX-512BW and VNNI; binary AVX-512BW and VPOPCNTDQ)
under emulation, so that every dispatch path is exercised by ``make test`` on any x86-64 machine, AVX2-only
ones included (on an AVX-512 machine the real paths also run in the kernel tests).

Each harness (csrc/*_emu_check.cc) compiles the AVX-512 source files with their intrinsics replaced by
scalar emulations and compares them bit for bit with scalar references. The executables are cached in
``build/emu-check/`` under a hash of every source file and of the compiler command, so a session compiles
them once (about 15 s on two busy cores) and later runs take well under a second.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "emu-check"
FLAGS = ["-std=c++17", "-O1", "-ffp-contract=off", "-pthread"]

HARNESSES = {
    "int8_vnni": ["int8_vnni_emu_check.cc", "int8_driver.cpp", "int8_dw_vnni.cpp", "int8_portable.cpp", "int8_avx2.cpp",
                  "parallel.cpp", "cpu_features.cpp", "epilogue.cpp"],
    "wb_avx512": ["wb_avx512_emu_check.cc", "w46.cpp", "w46_avx2.cpp", "binary.cpp", "binary_avx2.cpp", "parallel.cpp",
                  "cpu_features.cpp", "epilogue.cpp"],
}


def _compiler() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the emulation harnesses check x86 AVX-512 code")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    return cxx


def _build(name: str) -> Path:
    """The harness executable, compiled unless a build of the same sources and command is cached."""
    cxx = _compiler()
    srcs = HARNESSES[name]
    h = hashlib.sha256(" ".join([cxx, *FLAGS, *srcs]).encode())
    for f in sorted(CSRC.glob("*.h")) + [CSRC / s for s in srcs]:  # headers: any may be included
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    exe = CACHE / f"{name}-{h.hexdigest()[:16]}"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
    cmd = [cxx, *FLAGS[:-1], f"-I{CSRC}", *[str(CSRC / s) for s in srcs], FLAGS[-1], "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-3000:]}"
    os.replace(tmp, exe)
    for old in CACHE.glob(f"{name}-*"):  # older builds of this harness
        if old != exe and not old.name.endswith(".tmp"):
            old.unlink(missing_ok=True)
    return exe


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_avx512_paths_under_emulation(name: str) -> None:
    exe = _build(name)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 mismatches"), res.stdout[-3000:]
    assert int(last.split()[0]) > 100  # cases (wb) / runs (int8) actually checked
