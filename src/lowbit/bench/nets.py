"""The networks of ``lowbit bench models``: ImageNet-size ResNet-18 and MobileNetV2 written in lowbit
(no torchvision), and the CIFAR-size reference models of :mod:`lowbit.models`.

The weights are random (the benchmark measures speed and output agreement, not accuracy). Random
weights alone give logits that barely depend on the input, so :func:`reestimate_bn` resets every
BatchNorm's statistics and re-estimates them on random inputs: then every layer sees unit-scale,
input-dependent activations, as in a trained network, and "relative L2 error vs fp32" means something.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.models import BasicBlock, build

__all__ = ["ResNet18", "MobileNetV2", "BenchNet", "NETS", "make_net", "reestimate_bn"]


class ResNet18(nn.Module):
    """He et al.'s ResNet-18 for 224x224 inputs: 7x7/2 stem, 3x3/2 max-pool, 4 stages of 2 basic blocks
    (64, 128, 256, 512 channels; 1x1 conv + BN shortcut where the shape changes), global average pool, FC."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        cin = 64
        for i, w in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (t > 1) + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 projection
    + BN; residual add (no activation) when the stride is 1 and the width is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """Sandler et al.'s MobileNetV2 (width 1.0) for 224x224 inputs: 32-channel 3x3/2 stem, 17 inverted
    residual blocks, 1x1 conv to 1280 channels, global average pool, FC (no dropout: inference only)."""

    # (expansion t, output channels c, repeats n, first stride s)
    config = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for t, c, n, s in self.config:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


@dataclass(frozen=True)
class BenchNet:
    name: str
    size: int  # input side length (3 x size x size inputs)
    make: Callable[[], nn.Module]
    description: str


NETS: dict[str, BenchNet] = {
    "resnet18": BenchNet("resnet18", 224, ResNet18, "ResNet-18 @224, 1000 classes"),
    "mobilenetv2": BenchNet("mobilenetv2", 224, MobileNetV2, "MobileNetV2 @224, 1000 classes"),
    "resnet20": BenchNet("resnet20", 32, lambda: build("resnet20", 3, 10, 32), "CIFAR ResNet-20 @32, 10 classes"),
    "mobilenet": BenchNet("mobilenet", 32, lambda: build("mobilenet", 3, 10, 32),
                          "lowbit's small MobileNet @32, 10 classes"),
}


@torch.no_grad()
def reestimate_bn(model: nn.Module, inputs: list[torch.Tensor]) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average, momentum
    None) from forward passes over ``inputs`` in train mode; returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for x in inputs:
        model(x)
    return model.eval()


def make_net(name: str, seed: int = 0, bn_batches: int = 2, bn_batch_size: int = 8,
             size: int | None = None) -> tuple[nn.Module, int]:
    """Build benchmark net ``name`` with random weights (seeded) and BatchNorm statistics re-estimated on
    inputs of side ``size`` (default: the net's own); returns (model in eval mode, input side length)."""
    if name not in NETS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(NETS)}")
    spec = NETS[name]
    side = spec.size if size is None else int(size)
    torch.manual_seed(seed)
    model = spec.make()
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(bn_batch_size, 3, side, side, generator=g) for _ in range(bn_batches)]
    return reestimate_bn(model, xs), side
