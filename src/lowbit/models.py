"""Reference networks to quantize.

Built only from Conv2d / Linear / BatchNorm2d / ReLU / ReLU6 / MaxPool2d / AdaptiveAvgPool2d / Flatten
and residual adds, with static shapes and no data-dependent control flow, so every model traces with
``torch.fx.symbolic_trace``. Each adapts to the input (channels, square side length, classes):

* ``small_cnn``: a classic "CIFAR-10 intro" style net: four conv-BN-ReLU layers (32, 32, 64, 64
  channels) with 2x2 max-pooling, flattened at 4x4 into Linear(1024, 256) -> ReLU -> Linear. The number
  of pools depends on the input (8x8: 1, 28x28 and 32x32: 3; the 7 -> 4 step on 28x28 uses
  ``ceil_mode``) so the flatten size, and hence the parameter count (~0.33 M), is the same everywhere.
* ``tiny_cnn``: ``small_cnn`` with 2, 4, 4, 8 channels and a 16-unit hidden layer (~2.8 k parameters): a
  net with little redundancy, where 4-bit quantization costs points even on MNIST (the ``adapt`` study).
* ``tiny_cnn16``: ``small_cnn`` with 16 channels in every conv and a 32-unit hidden layer (~15.7 k
  parameters at 28x28): the smallest net of this shape that still learns MNIST with binary weights and
  activations (the ``binary`` study's "tiny CNN of <= 20 K parameters"; ``tiny_cnn`` is too narrow).
* ``resnet20``: He et al.'s CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels) with
  option-B shortcuts (1x1 conv + BN) where the shape changes; ~0.27 M parameters.
* ``mobilenet``: MobileNet-v1 style depthwise-separable blocks (3x3 depthwise conv + BN + ReLU6,
  1x1 pointwise conv + BN + ReLU6) at a small width; stride-2 blocks only downsample while the
  feature map is at least 8x8.

Construction is deterministic given ``torch.manual_seed``. :func:`build` records its arguments on the
model as ``model.lowbit_arch`` (a plain dict) so checkpoints can rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "available_models", "build", "SmallCNN", "TinyCNN", "TinyCNN16", "ResNet20", "MobileNet"]


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


def _out_size(size: int, stride: int) -> int:
    """Output side of a k=3, padding=1 conv (or a ceil-mode 2x2 pool) with this stride."""
    return (size - 1) // stride + 1


# ---------------------------------------------------------------------------------------- small_cnn


class SmallCNN(nn.Module):
    """conv-bn-relu x4 with max-pooling, then two Linear layers (see module docstring)."""

    widths = (32, 32, 64, 64)
    hidden = 256
    target = 4  # side length the features are pooled down to before flattening

    def __init__(self, in_channels: int, num_classes: int, input_size: int) -> None:
        super().__init__()
        n_pools, side = 0, input_size
        while side > self.target:
            side = _out_size(side, 2)
            n_pools += 1
        # Where the pools go, by preference: after conv2, after conv4, after conv1.
        pool_after = {1: {1}, 2: {1, 3}}.get(n_pools, {0, 1, 3}) if n_pools else set()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(self.widths):
            layers += [*_conv_bn(cin, w), nn.ReLU()]
            if i in pool_after:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            cin = w
        # More than three halvings needed (inputs > 32): pool further at the end.
        layers += [nn.MaxPool2d(2, 2, ceil_mode=True) for _ in range(max(0, n_pools - 3))]
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(cin * side * side, self.hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(self.hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.features(x))
        return self.fc2(self.relu(self.fc1(x)))


class TinyCNN(SmallCNN):
    """:class:`SmallCNN` with very few channels (module docstring)."""

    widths = (2, 4, 4, 8)
    hidden = 16


class TinyCNN16(SmallCNN):
    """:class:`SmallCNN` with 16 channels per conv and 32 hidden units (module docstring)."""

    widths = (16, 16, 16, 16)
    hidden = 32


# ----------------------------------------------------------------------------------------- resnet20


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual add; 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, input_size: int, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 16), nn.ReLU())
        stages: list[nn.Module] = []
        cin = 16
        for i, w in enumerate((16, 32, 64)):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(BasicBlock(cin, w, stride))
                cin = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


# ---------------------------------------------------------------------------------------- mobilenet


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv (groups = channels) + BN + ReLU6, then 1x1 pointwise conv + BN + ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU6()
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.dw(x)))
        return self.relu2(self.bn2(self.pw(x)))


class MobileNet(nn.Module):
    # (output channels, stride) per depthwise-separable block
    config: tuple[tuple[int, int], ...] = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1))
    stem_width = 16

    def __init__(self, in_channels: int, num_classes: int, input_size: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, self.stem_width), nn.ReLU6())
        blocks: list[nn.Module] = []
        cin, side = self.stem_width, input_size
        for cout, stride in self.config:
            s = stride if side >= 8 else 1
            blocks.append(DepthwiseSeparable(cin, cout, s))
            cin, side = cout, _out_size(side, s)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


# ------------------------------------------------------------------------------------------ registry

MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "small_cnn": SmallCNN,
    "tiny_cnn": TinyCNN,
    "tiny_cnn16": TinyCNN16,
    "resnet20": ResNet20,
    "mobilenet": MobileNet,
}


def available_models() -> list[str]:
    return list(MODELS)


def build(name: str, in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    """Build reference model ``name`` for ``in_channels`` x ``input_size`` x ``input_size`` inputs.

    Weights come from the global torch RNG (call ``torch.manual_seed`` first for reproducibility).
    """
    key = name.strip().lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(MODELS)}")
    for arg, v in (("in_channels", in_channels), ("num_classes", num_classes), ("input_size", input_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    model = MODELS[key](in_channels, num_classes, input_size)
    model.lowbit_arch = {  # type: ignore[assignment]
        "model": key,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "input_size": input_size,
    }
    return model
