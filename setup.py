"""Build of lowbit's native kernels (csrc/ -> lowbit._native).

The extension is plain C++17 plus pybind11; it never includes torch headers, so pip's isolated build
environment does not need torch. No -march=native: every SIMD function carries its own target
attribute and is chosen at run time by a CPU check, so one wheel runs on any x86-64 or ARM machine.
"""

import glob
import platform
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

extra = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-pthread", "-fvisibility=hidden"]
if sys.platform == "win32":
    extra = ["/O2", "/std:c++17"]
elif platform.machine().lower() in ("aarch64", "arm64"):
    extra.append("-march=armv8-a")

ext = Pybind11Extension(
    "lowbit._native",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=extra,
    extra_link_args=["-pthread"] if sys.platform != "win32" else [],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
