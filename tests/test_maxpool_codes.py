"""Max pooling on integer codes (issue 6): exact for any map size, through every kernel path."""

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import kernels
from lowbit.evaluate import model_input
from lowbit.kernels import PoolGeometry
from lowbit.nn import QMaxPool2d

ORDER = {"portable": 0, "neon": 1, "avx2": 2, "avx512bw": 3, "vnni": 4}


def _paths() -> list[str]:
    """Kernel paths this machine can run: the native ISA caps, and the PyTorch backend."""
    try:
        from lowbit.kernels import native
    except ImportError:  # pragma: no cover - depends on the build
        return ["torch"]
    if not native.available():  # pragma: no cover
        return ["torch"]
    best = native.best_isa()
    isas = [i for i in ("portable", "avx2", "avx512bw", "vnni") if i == "portable" or ORDER[i] <= ORDER[best]]
    return [*isas, "torch"]


@contextlib.contextmanager
def _path(name: str):
    if name == "torch":
        kernels.set_backend("torch")
        try:
            yield
        finally:
            kernels.set_backend(None)
        return
    from lowbit.kernels import native

    with native.isa(name):
        yield


def test_codes_equal_torch_max_pool_on_floats():
    """Every geometry torch accepts (kernel, stride, padding, dilation, ceil_mode), NCHW and
    channels-last, uint8 and int8: the pooled codes equal torch's float max-pool of the codes."""
    g = torch.Generator().manual_seed(0)
    n = 0
    for k, s, p, d, c in itertools.product([1, 2, 3], [None, 1, 2], [0, 1], [1, 2], [False, True]):
        try:
            geo = PoolGeometry.make(k, s, p, d, c)
        except ValueError:
            continue
        for h, w in ((5, 7), (13, 12), (28, 28)):
            x = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=g)
            ref = F.max_pool2d(x.float(), k, s, p, d, c)
            for xin in (x, x.contiguous(memory_format=torch.channels_last)):
                out = kernels.max_pool2d_codes(xin, geo)
                assert out.dtype == torch.uint8 and torch.equal(out.float(), ref), (k, s, p, d, c, h, w)
            xs = (x.to(torch.int16) - 128).to(torch.int8)
            assert torch.equal(kernels.max_pool2d_codes(xs, geo).float(), F.max_pool2d(xs.float(), k, s, p, d, c))
            n += 1
    assert n > 100


def test_large_channels_last_map():
    """The crash of issue 6: channels-last uint8 maps of 12x12 and more (here 64 x 112 x 112)."""
    x = torch.randint(0, 256, (1, 64, 112, 112), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = QMaxPool2d(3, 2, 1)(x)
    assert torch.equal(out.float(), F.max_pool2d(x.float(), 3, 2, 1))


def test_bad_geometry_is_refused_when_built():
    with pytest.raises(ValueError, match="padding"):
        QMaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="kernel"):
        QMaxPool2d(0)
    with pytest.raises(ValueError, match="smaller than the window"):
        QMaxPool2d(5)(torch.zeros(1, 1, 3, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or int8"):
        QMaxPool2d(2)(torch.zeros(1, 1, 4, 4))


def _net(size: int) -> nn.Module:
    torch.manual_seed(size)
    stride = 1 if size <= 64 else 4
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=stride, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.Conv2d(8, 4, 3, dilation=1), nn.MaxPool2d(2, dilation=2), nn.Flatten(), nn.LazyLinear(10),
    )


@pytest.mark.parametrize("size", [28, 224])
@pytest.mark.parametrize("method", ["static", "full_integer"])
def test_quantized_models_with_max_pool_on_every_path(method, size, tmp_path):
    """static / full_integer models with max-pools over 28x28 (MNIST) and 224x224 maps run on
    every kernel path with identical outputs, and each max-pool's output codes are its input codes'
    window maxima; the saved and reloaded model gives the same output."""
    model = _net(size)
    x = torch.randn(6, 3, size, size)
    model(x)
    model.eval()
    q = lowbit.quantize(model, method, calib=x)
    pools = [m for m in q.modules() if isinstance(m, QMaxPool2d)]
    assert len(pools) == 3
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for m in pools]
    xin = model_input(q, x[:2])
    outs = {}
    for path in _paths():
        seen.clear()
        with _path(path), torch.no_grad():
            outs[path] = q(xin)
        for (pin, pout), m in zip(seen, pools, strict=True):
            geo = m.geometry
            ref = F.max_pool2d(pin.float(), geo.kernel, geo.stride, geo.padding, geo.dilation, geo.ceil_mode)
            assert pout.dtype == torch.uint8 and torch.equal(pout.float(), ref), path
    for h in hooks:
        h.remove()
    first = next(iter(outs.values()))
    for path, y in outs.items():
        assert torch.equal(y, first), f"{path} differs"
    r = lowbit.load(lowbit.save(q, tmp_path / "m.lowbit"))
    with torch.no_grad():
        assert torch.equal(r(xin), first)


def test_max_pool_with_indices_stays_float_in_static():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.pool = nn.MaxPool2d(2, return_indices=True)
            self.fc = nn.Linear(4 * 13 * 13, 3)

        def forward(self, x):
            y, _ = self.pool(self.conv(x))
            return self.fc(torch.flatten(y, 1))

    x = torch.randn(8, 1, 28, 28)
    q = lowbit.quantize(Net().eval(), "static", calib=x)
    assert not any(isinstance(m, QMaxPool2d) for m in q.modules())
    assert q(x).shape == (8, 3)
