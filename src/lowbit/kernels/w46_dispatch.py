"""Which kernel runs a 4.6-bit layer: the 4.6-bit kernel or the int8 kernel on the same codes.

Both compute exactly the same integers (the 4.6-bit codes are int8 codes too), so the choice is only
about speed, decided per layer shape once per process and cached: whichever measures faster on the layer's
problem (its weight shape, the input shape, the geometry, the thread count, the kernel path), timed on the
first call with that problem (warm-up, then interleaved rounds, the minimum of each).

* Without int8 dot products (the ``avx2`` and ``avx512bw`` paths, ``portable``) the 4.6-bit kernel usually
  wins: its int16 accumulation of ``vpmaddubsw`` pair sums, exact under ``K_x·K_w <= 127``, against the int8
  kernel's ``vpmaddwd`` on widened operands (methods.md §2, x86 note) — 1.3–2x on 3x3 and linear layers.
  It loses badly on depthwise convolutions (MobileNetV2 on AVX2: 5x slower as a whole), which is why it
  is measured there too.
* With AVX-512 VNNI (``vnni`` path) both do ``vpdpbusd`` and either may win.

A model run as a plan makes the same choice on the plan itself (:mod:`lowbit.runtime.w46_choice`).
``LOWBIT_W46_DISPATCH=auto|w46|int8`` (or :func:`set_dispatch`) forces one kernel, e.g. to benchmark
the 4.6-bit kernel on a VNNI CPU. :func:`choices` lists the decisions made so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

from .w46 import env as getenv

__all__ = ["MODES", "set_dispatch", "dispatch_mode", "choose", "choices", "clear"]

MODES = ("auto", "w46", "int8")
_mode: list[str | None] = [None]
_CHOICES: dict[tuple[Any, ...], dict[str, Any]] = {}
_WARMUP, _ROUNDS = 2, 7


def set_dispatch(mode: str | None) -> None:
    """Force ``"w46"`` or ``"int8"`` for every 4.6-bit layer, or ``"auto"`` / None (the default rule)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown 4.6-bit dispatch mode {mode!r}; use one of {', '.join(MODES)}")
    _mode[0] = mode


def dispatch_mode() -> str:
    """The mode in force: :func:`set_dispatch`'s, else ``LOWBIT_W46_DISPATCH``, else ``auto``."""
    if _mode[0] is not None:
        return _mode[0]
    env = getenv("LOWBIT_W46_DISPATCH").strip().lower()
    if env and env not in MODES:
        raise ValueError(f"LOWBIT_W46_DISPATCH={env!r}: use one of {', '.join(MODES)} (or unset it)")
    return env or "auto"


def _measure(candidates: dict[str, Callable[[], Any]]) -> dict[str, float]:
    for fn in candidates.values():
        for _ in range(_WARMUP):
            fn()
    best = {k: float("inf") for k in candidates}
    for _ in range(_ROUNDS):
        for k, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def choose(problem: Hashable, path: str, threads: int, run_w46: Callable[[], Any],
           run_int8: Callable[[], Any]) -> str:
    """``"w46"`` or ``"int8"`` for ``problem`` (a hashable description of the layer's call) on kernel path
    ``path`` with ``threads`` threads; the run functions compute the layer's output on each kernel."""
    mode = dispatch_mode()
    if mode != "auto":
        return mode
    key = (problem, path, int(threads))
    hit = _CHOICES.get(key)
    if hit is None:
        times = _measure({"w46": run_w46, "int8": run_int8})
        hit = {"kernel": min(times, key=lambda k: times[k]), "us": {k: round(v * 1e6, 2) for k, v in times.items()}}
        _CHOICES[key] = hit
    return str(hit["kernel"])


def choices() -> list[dict[str, Any]]:
    """The measured decisions so far: problem, path, threads, chosen kernel, best times in µs."""
    return [{"problem": k[0], "path": k[1], "threads": k[2], **v} for k, v in _CHOICES.items()]


def clear() -> None:
    """Forget the measured decisions (the next call of each problem measures again)."""
    _CHOICES.clear()
