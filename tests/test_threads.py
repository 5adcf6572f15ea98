"""lowbit models run with torch single-threaded and lowbit's pool at the user's thread count
(lowbit.kernels.threads), restored afterwards, also when the forward raises."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.kernels import threads

native = pytest.importorskip("lowbit.kernels.native")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()


@pytest.fixture
def torch_threads():
    before_t, before_l = torch.get_num_threads(), native.num_threads()
    yield
    torch.set_num_threads(before_t)
    native.set_num_threads(None)
    native.set_num_threads(before_l)
    native.set_num_threads(None)


@pytest.fixture
def spy(monkeypatch):
    """Records (torch threads, lowbit threads) at every native convolution call."""
    seen: list[tuple[int, int]] = []
    real = native.int8_conv2d

    def conv(*a, **k):
        seen.append((torch.get_num_threads(), native.num_threads()))
        return real(*a, **k)

    monkeypatch.setattr(native, "int8_conv2d", conv)
    monkeypatch.setenv("LOWBIT_PLAN", "0")  # the node-by-node path; tests/test_plan.py checks the plan's threads
    return seen


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_quantized_model_runs_torch_single_threaded(method, torch_threads, spy, tmp_path):
    x = torch.randn(4, 3, 8, 8)
    q = lowbit.quantize(_model(), method, x)
    path = tmp_path / "m.lowbit"
    lowbit.save(q, path)
    torch.set_num_threads(3)
    native.set_num_threads(None)  # follow torch
    for m in (q, copy.deepcopy(q), lowbit.load(path)):
        spy.clear()
        m(x[:1])
        assert spy == [(1, 3), (1, 3)]  # inside: torch 1 thread, lowbit's pool at the user's 3
        assert torch.get_num_threads() == 3  # restored
    native.set_num_threads(2)  # an explicit lowbit setting wins over torch's
    spy.clear()
    q(x[:1])
    assert spy == [(1, 2), (1, 2)] and torch.get_num_threads() == 3


def test_restored_when_the_forward_raises(torch_threads):
    q = lowbit.quantize(_model(), "static", torch.randn(4, 3, 8, 8))
    torch.set_num_threads(2)
    with pytest.raises(ValueError):
        q(torch.randn(1, 5, 8, 8))  # wrong channel count
    assert torch.get_num_threads() == 2
    with threads.lowbit_threads(), threads.lowbit_threads():  # nested: restored once, at the outer exit
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
