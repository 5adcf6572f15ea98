"""Threads: lowbit's kernels and torch's OpenMP pool must not fight over the cores.

lowbit's native kernels run on their own thread pool. torch's OpenMP workers, once woken by a parallel
torch op, spin for milliseconds after it (libgomp's default wait policy) on the very cores lowbit's pool
wants next: measured on a 2-core machine, the glue torch ops of a converted model (quantize,
dequantize, clamps) left lowbit's convolutions with about half of their second core. So while a lowbit
model runs, torch's intra-op threads are set to 1 (its glue is small element-wise work) and lowbit's
pool takes the user's thread count (``torch.get_num_threads()`` as it was, or
``lowbit.kernels.native.set_num_threads``); both are restored when the forward returns or raises.

:func:`guard_forward` wraps the forward of every lowbit module (``lowbit.nn.LowbitModule`` does it for
its subclasses), so the guard holds however a model is copied; :func:`guard_model` adds it around a whole
model as a pair of forward hooks (then the modules inside find it set and do nothing; ``copy.deepcopy``
of a torch.fx GraphModule drops hooks, the module guards remain). :func:`lowbit_threads` is the same as
a context manager.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["lowbit_threads", "guard_model", "guard_forward"]

_local = threading.local()


def _enter() -> None:
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    if depth:
        return  # a lowbit model inside a lowbit model: the outer one set things up
    n = torch.get_num_threads()
    _local.saved = n
    try:
        from . import native

        native.follow_torch_threads(n)
    except ImportError:  # pragma: no cover - depends on the build
        pass
    if n > 1:
        torch.set_num_threads(1)


def _exit() -> None:
    _local.depth -= 1
    if _local.depth == 0 and _local.saved > 1:
        torch.set_num_threads(_local.saved)


@contextlib.contextmanager
def lowbit_threads() -> Iterator[None]:
    """torch single-threaded, lowbit's pool at the user's thread count, for the duration of the block."""
    _enter()
    try:
        yield
    finally:
        _exit()


def guard_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` run under :func:`lowbit_threads` (a plain call when a guard is already active)."""

    @functools.wraps(forward)
    def guarded(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "depth", 0):
            return forward(self, *args, **kwargs)
        _enter()
        try:
            return forward(self, *args, **kwargs)
        finally:
            _exit()

    guarded.__lowbit_thread_guard__ = True  # type: ignore[attr-defined]
    return guarded


def _pre_hook(module: nn.Module, args: Any) -> None:
    _enter()


def _post_hook(module: nn.Module, args: Any, output: Any) -> None:
    _exit()


def guard_model(model: nn.Module) -> nn.Module:
    """Run ``model``'s forward under :func:`lowbit_threads` (idempotent); returns the model."""
    if not getattr(model, "_lowbit_thread_guard", False):
        model.register_forward_pre_hook(_pre_hook)
        model.register_forward_hook(_post_hook, always_call=True)
        model._lowbit_thread_guard = True  # type: ignore[assignment]
    return model
