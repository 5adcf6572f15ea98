"""Graph front-end: model loading (.pt2 / factory), preparation (normalize, BN folding, fusion)."""

from __future__ import annotations

import operator
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.graph import (
    SUPPORTED_FUNCTIONS,
    SUPPORTED_MODULES,
    Fused,
    ModelLoadError,
    Prepared,
    is_supported,
    layer_names,
    load_model,
    node_module,
    prepare,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add overhead (and thrash on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics so that folding mistakes show up."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class ConvBNReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TVBlock(nn.Module):
    """torchvision's BasicBlock spelling: one shared in-place ReLU module and ``out += identity``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(TVBlock(8, 8, 1), TVBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layer1(x))
        return self.fc(torch.flatten(x, 1))


class ResNetTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1)
        x = x.view(x.size(0), -1)
        return self.fc(x)


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn_dw = nn.BatchNorm2d(cin)
        self.act_dw = nn.ReLU6(inplace=True)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(cout)
        self.act_pw = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_dw(self.bn_dw(self.dw(x)))
        return self.act_pw(self.bn_pw(self.pw(x)))


class MobileTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(DepthwiseSeparable(8, 16, 1), DepthwiseSeparable(16, 32, 2))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = x.mean([2, 3])
        return self.head(self.dropout(x))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.bn2 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        x = F.relu6(self.bn2(self.fc2(x)))
        return self.out(x)


class Functional(nn.Module):
    """Every spelling prepare() has to normalize."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.c5 = nn.Conv2d(8, 8, 1)
        self.ident = nn.Identity()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(8 * 4 * 4, 16)
        self.fc3 = nn.Linear(8 * 4 * 4, 16)
        self.fc4 = nn.Linear(8 * 4 * 4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        b = self.c2(a).relu()
        c = F.hardtanh(self.c3(b), 0.0, 6.0)
        d = torch.add(F.relu6(self.c4(c)), b)
        d = d.add(self.ident(torch.relu(self.c5(d))))
        d = F.max_pool2d(d, 2)
        d = F.relu(d, inplace=True)
        d = F.avg_pool2d(d, 2)
        y1 = self.fc1(d.view(d.size(0), -1))
        y2 = self.fc2(d.reshape(d.shape[0], -1))
        y3 = self.fc3(d.flatten(1))
        y4 = self.fc4(self.flat(d))
        z = y1 + y2 + y3 + d.view(-1, 8 * 4 * 4)[:, :16] * 0 + y4
        return F.dropout(z, 0.5, training=self.training)


class WithUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.conv1(x))
        x = self.bn(x)  # standalone: follows a sigmoid, not a conv
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return torch.softmax(self.fc(x), dim=1)


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(float(ref.detach().abs().max()), 1.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)


def _modules_of(gm: fx.GraphModule, cls: type) -> dict[str, nn.Module]:
    return {n.target: node_module(gm, n) for n in gm.graph.nodes if isinstance(node_module(gm, n), cls)}


def _no_bn(gm: fx.GraphModule) -> bool:
    return not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in gm.modules())


def _all_supported(p: Prepared) -> None:
    assert p.unsupported == []
    assert all(is_supported(n, p.gm) for n in p.gm.graph.nodes)


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------

IMG = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "make, example",
    [
        (ConvBNReLU, IMG),
        (ResNetTiny, IMG),
        (TVResNet, IMG),
        (MobileTiny, IMG),
        (MLP, torch.randn(6, 20, generator=torch.Generator().manual_seed(2))),
        (Functional, IMG),
        (WithUnsupported, IMG),
    ],
)
def test_prepare_matches_model(make, example) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(make())
    with torch.no_grad():
        ref = model(example)
    p = prepare(model, example)
    assert isinstance(p, Prepared) and isinstance(p.gm, fx.GraphModule)
    with torch.no_grad():
        _assert_close(p.gm(example), ref)
        # another batch size works too (flatten is not baked to the example's batch)
        _assert_close(p.gm(example[:1]), model(example[:1]))
    # the model itself is untouched
    assert any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()) == any(
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in make().modules()
    )


def test_conv_bn_relu_folded_and_fused() -> None:
    model = _randomize_bn(ConvBNReLU())
    p = prepare(model, IMG)
    _all_supported(p)
    assert _no_bn(p.gm)
    fused = _modules_of(p.gm, Fused)
    assert set(fused) == {"features.0", "features.3"}
    assert all(f.act == "relu" for f in fused.values())
    assert isinstance(fused["features.0"].layer, nn.Conv2d) and fused["features.0"].layer.bias is not None
    assert layer_names(p.gm) == ["features.0", "features.3", "classifier"]
    kinds = [type(node_module(p.gm, n)) for n in p.gm.graph.nodes if n.op == "call_module"]
    assert kinds == [Fused, Fused, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear]
    assert not any(isinstance(m, nn.ReLU) for m in p.gm.modules())


def test_fold_math_exact_in_float64() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    bn = nn.BatchNorm2d(6).double()
    model = _randomize_bn(nn.Sequential(conv, bn)).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    p = prepare(model, x)
    assert _no_bn(p.gm) and layer_names(p.gm) == ["0"]
    torch.testing.assert_close(p.gm(x), model(x), rtol=1e-12, atol=1e-12)


def test_resnet_structure() -> None:
    model = _randomize_bn(ResNetTiny())
    p = prepare(model, IMG)
    _all_supported(p)
    assert _no_bn(p.gm)
    fused = _modules_of(p.gm, Fused)
    assert set(fused) == {"conv1", "layer1.conv1", "layer2.conv1"}
    # conv2 feeds the add, so it is folded but not fused; the shortcut conv is folded too
    assert type(p.gm.get_submodule("layer1.conv2")) is nn.Conv2d
    assert type(p.gm.get_submodule("layer2.shortcut.0")) is nn.Conv2d
    adds = [n for n in p.gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 2
    relus_after_add = [n for n in p.gm.graph.nodes if isinstance(node_module(p.gm, n), nn.ReLU)]
    assert [r.args[0] for r in relus_after_add] == adds
    flat = [n for n in p.gm.graph.nodes if n.target is torch.flatten]
    assert len(flat) == 1 and flat[0].args[1:] == (1,)
    assert layer_names(p.gm) == [
        "conv1",
        "layer1.conv1",
        "layer1.conv2",
        "layer2.conv1",
        "layer2.conv2",
        "layer2.shortcut.0",
        "fc",
    ]


def test_torchvision_style_resnet() -> None:
    model = _randomize_bn(TVResNet())
    p = prepare(model, IMG)
    _all_supported(p)
    assert _no_bn(p.gm)
    fused = _modules_of(p.gm, Fused)
    assert set(fused) == {"conv1", "layer1.0.conv1", "layer1.1.conv1"}
    assert layer_names(p.gm) == [
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
        "layer1.1.downsample.0",
        "fc",
    ]
    # the shared in-place ReLU that follows each add is now out-of-place
    relus = [node_module(p.gm, n) for n in p.gm.graph.nodes if isinstance(node_module(p.gm, n), nn.ReLU)]
    assert len(relus) == 2 and not any(r.inplace for r in relus)


def test_mobilenet_depthwise_relu6() -> None:
    model = _randomize_bn(MobileTiny())
    p = prepare(model, IMG)
    _all_supported(p)
    fused = _modules_of(p.gm, Fused)
    assert set(fused) == {"stem.0", "blocks.0.dw", "blocks.0.pw", "blocks.1.dw", "blocks.1.pw"}
    assert all(f.act == "relu6" for f in fused.values())
    assert fused["blocks.1.dw"].layer.groups == 16
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in p.gm.modules())  # the mean([2, 3])
    assert not any(isinstance(m, nn.Dropout) for m in p.gm.modules())


def test_mlp_linear_bn1d() -> None:
    model = _randomize_bn(MLP())
    x = torch.randn(6, 20)
    p = prepare(model, x)
    _all_supported(p)
    assert _no_bn(p.gm)
    fused = _modules_of(p.gm, Fused)
    assert {k: (type(f.layer), f.act) for k, f in fused.items()} == {
        "fc1": (nn.Linear, "relu"),
        "fc2": (nn.Linear, "relu6"),
    }
    assert fused["fc2"].layer.bias is not None
    assert layer_names(p.gm) == ["fc1", "fc2", "out"]


def test_conv1d_bn1d_relu() -> None:
    model = _randomize_bn(nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU()))
    x = torch.randn(3, 4, 10)
    p = prepare(model, x)
    _all_supported(p)
    assert isinstance(p.gm.get_submodule("0"), Fused) and isinstance(p.gm.get_submodule("0").layer, nn.Conv1d)
    _assert_close(p.gm(x), model(x))


def test_functional_spellings_normalized() -> None:
    model = Functional().eval()
    p = prepare(model, IMG)
    # only the slice/mul of the zero term stays float
    for n in p.gm.graph.nodes:
        if n.op == "call_function":
            assert n.target in SUPPORTED_FUNCTIONS or "getitem" in str(n.target) or "mul" in str(n.target)
        assert n.op != "call_method", n.format_node()
    fused = _modules_of(p.gm, Fused)
    assert {k: f.act for k, f in fused.items()} == {
        "c1": "relu",
        "c2": "relu",
        "c3": "relu6",
        "c4": "relu6",
        "c5": "relu",
    }
    flat = [n for n in p.gm.graph.nodes if n.target is torch.flatten]
    assert len(flat) == 5 and all(n.args[1:] == (1,) and not n.kwargs for n in flat)
    assert not any(isinstance(m, (nn.Identity, nn.Flatten)) for m in p.gm.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in p.gm.modules())
    assert any(isinstance(m, nn.AvgPool2d) for m in p.gm.modules())
    assert [u.split(":")[1].split()[-1] for u in p.unsupported] == ["operator.getitem", "operator.mul"], p.unsupported


def test_unsupported_listing() -> None:
    model = _randomize_bn(WithUnsupported())
    p = prepare(model, IMG)
    text = "\n".join(p.unsupported)
    assert "sigmoid: call_function torch.sigmoid" in p.unsupported
    assert any(u.startswith("bn: call_module bn (BatchNorm2d)") for u in p.unsupported), text
    assert any("softmax" in u for u in p.unsupported), text
    assert len(p.unsupported) == 3
    assert isinstance(p.gm.get_submodule("conv2"), Fused)
    assert type(p.gm.get_submodule("conv1")) is nn.Conv2d  # sigmoid is not fused
    sig = next(n for n in p.gm.graph.nodes if n.name == "sigmoid")
    assert not is_supported(sig, p.gm)


def test_supported_constants_and_helpers() -> None:
    assert set(SUPPORTED_MODULES) == {
        nn.Conv1d,
        nn.Conv2d,
        nn.Linear,
        Fused,
        nn.ReLU,
        nn.ReLU6,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
    }
    assert set(SUPPORTED_FUNCTIONS) == {operator.add, torch.flatten}
    p = prepare(_randomize_bn(ConvBNReLU()), IMG)
    for n in p.gm.graph.nodes:
        if n.op == "call_module":
            assert node_module(p.gm, n) is p.gm.get_submodule(n.target)
        else:
            assert node_module(p.gm, n) is None


def test_fused_module() -> None:
    lin = nn.Linear(5, 3)
    x = torch.randn(2, 5) * 10
    assert torch.equal(Fused(lin, "relu")(x), F.relu(lin(x)))
    assert torch.equal(Fused(lin, "relu6")(x), F.relu6(lin(x)))
    with pytest.raises(ValueError, match="act"):
        Fused(lin, "gelu")
    with pytest.raises(TypeError):
        Fused(nn.ReLU(), "relu")  # type: ignore[arg-type]


def test_nan_inf_rejected() -> None:
    model = ConvBNReLU()
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="parameter 'features.0.weight' contains NaN"):
        prepare(model, IMG)
    model = ConvBNReLU()
    model.features[1].running_var[3] = float("inf")
    with pytest.raises(ValueError, match="buffer 'features.1.running_var' contains Inf"):
        prepare(model, IMG)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y
        return -y


def test_trace_failure_explained() -> None:
    with pytest.raises(ValueError, match="control flow on tensor values") as err:
        prepare(DataDependent(), torch.randn(2, 4))
    assert "torch.export" in str(err.value) and "dynamic, weight_only, float16" in str(err.value)


def test_shared_layer_and_inplace_aliasing() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = F.relu(self.conv(x))
            b = F.relu6(self.conv(a))
            y = self.head(b)
            z = F.relu(y, inplace=True)  # y is mutated: y + z == 2 * relu(head(b))
            return y + z

    model = Shared().eval()
    p = prepare(model, IMG)
    _assert_close(p.gm(IMG), model(IMG))
    fused = _modules_of(p.gm, Fused)
    assert len(fused) == 3 and "head" in fused
    assert sorted(f.act for f in fused.values()) == ["relu", "relu", "relu6"]
    # both uses of the shared conv keep the same weights
    convs = [f.layer for f in fused.values() if f.layer.in_channels == 3 and f.layer.out_channels == 3]
    assert len(convs) == 2 and torch.equal(convs[0].weight, convs[1].weight)


def test_prepare_accepts_graph_module() -> None:
    model = _randomize_bn(ResNetTiny())
    gm = fx.symbolic_trace(model)
    p = prepare(gm, IMG)
    _all_supported(p)
    _assert_close(p.gm(IMG), model(IMG))
    assert any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())  # input left alone


# ---------------------------------------------------------------------------------------------
# load_model: .pt2
# ---------------------------------------------------------------------------------------------


def _export(model: nn.Module, x: torch.Tensor, path: Path, decompose: bool = False) -> torch.export.ExportedProgram:
    ep = torch.export.export(model.eval(), (x,))
    if decompose:
        ep = ep.run_decompositions()
    torch.export.save(ep, str(path))
    return ep


class ExportNet(nn.Module):
    """One small net with every construct the .pt2 converter maps (keeps the export count low)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2)
        self.block = TVBlock(8, 8, 1)
        self.dws = DepthwiseSeparable(8, 16, 2)
        self.avg = nn.AvgPool2d(2, stride=1)
        self.fc1 = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dws(self.block(self.pool(self.stem(x))))
        x = self.avg(x).mean([2, 3])
        x = self.drop(F.relu(self.bn(self.fc1(x))))
        return self.fc2(x)


@pytest.fixture(scope="module")
def export_net() -> tuple[nn.Module, torch.export.ExportedProgram]:
    torch.manual_seed(0)
    model = _randomize_bn(ExportNet())
    return model, torch.export.export(model.eval(), (IMG,))


@pytest.mark.parametrize("decompose", [False, True])
def test_pt2_round_trip(tmp_path: Path, export_net, decompose: bool) -> None:
    model, ep = export_net
    if decompose:  # core-ATen spelling: convolution, addmm, _native_batch_norm_legit_no_training, ...
        ep = ep.run_decompositions()
    example = IMG
    path = tmp_path / "model.pt2"
    torch.export.save(ep, str(path))
    loaded = load_model(str(path))
    assert isinstance(loaded, fx.GraphModule) and not loaded.training
    for n in loaded.graph.nodes:  # module-level, no ATen ops left
        assert n.op in ("placeholder", "output", "call_module", "call_function")
        if n.op == "call_function":
            assert n.target in (operator.add, torch.flatten), n.format_node()
    with torch.no_grad():
        ref = ep.module()(example)
        _assert_close(loaded(example), ref)
        _assert_close(loaded(example), model(example))
    # converted module names follow the original model, so prepare() gives the same layer names
    p = prepare(loaded, example)
    _all_supported(p)
    assert _no_bn(p.gm)
    assert layer_names(p.gm) == layer_names(prepare(model, example).gm)
    with torch.no_grad():
        _assert_close(p.gm(example), ref)


class Sorting(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, dim=-1)[0]


def test_pt2_unsupported_op(tmp_path: Path) -> None:
    """Ops without a module form stay ATen calls (float islands); an op outside what a lowbit file may
    run is an error naming it."""
    path = tmp_path / "m.pt2"
    _export(WithUnsupported(), IMG, path)
    gm = load_model(str(path))
    assert any(n.target is torch.ops.aten.sigmoid.default for n in gm.graph.nodes)
    _export(Sorting(), IMG, path)
    with pytest.raises(NotImplementedError, match="aten.sort"):
        load_model(str(path))


def test_pt2_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing.pt2"))
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match="torch.export archive"):
        load_model(str(bad))
    with pytest.raises(ModelLoadError, match="own weights"):
        load_model(str(tmp_path / "any.pt2"), weights_file=str(tmp_path / "w.pt"))


# ---------------------------------------------------------------------------------------------
# load_model: package.module:function
# ---------------------------------------------------------------------------------------------

MODEL_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn


    def build():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


    def build_wide(width=8):
        return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))


    def not_a_module():
        return 42


    def broken():
        raise RuntimeError("boom")


    INSTANCE = nn.Linear(4, 2)
    """
)


@pytest.fixture
def model_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"lowbit_test_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODEL_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_factory_with_weights(model_pkg: str, tmp_path: Path) -> None:
    torch.manual_seed(123)
    src = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    weights = tmp_path / "w.pt"
    torch.save(src.state_dict(), weights)
    model = load_model(f"{model_pkg}:build", str(weights))
    assert isinstance(model, nn.Module) and not model.training
    x = torch.randn(3, 4)
    assert torch.equal(model(x), src(x))
    # without weights: a fresh model
    assert isinstance(load_model(f"{model_pkg}:build"), nn.Sequential)
    # keyword options go to the factory; a module instance is used as is
    assert load_model(f"{model_pkg}:build_wide", width=5)[0].out_features == 5
    assert isinstance(load_model(f"{model_pkg}:INSTANCE"), nn.Linear)
    # checkpoints wrapping the state_dict are unwrapped
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, weights)
    assert torch.equal(load_model(f"{model_pkg}:build", str(weights))(x), src(x))


def test_factory_errors(model_pkg: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot import module 'no_such_module_lowbit'"):
        load_model("no_such_module_lowbit:build")
    with pytest.raises(ModelLoadError, match="has no attribute 'nope'"):
        load_model(f"{model_pkg}:nope")
    with pytest.raises(ModelLoadError, match="returned a int, not a torch.nn.Module"):
        load_model(f"{model_pkg}:not_a_module")
    with pytest.raises(ModelLoadError, match="boom"):
        load_model(f"{model_pkg}:broken")
    with pytest.raises(ModelLoadError, match="unrecognized model spec"):
        load_model("just_a_name")
    with pytest.raises(FileNotFoundError):
        load_model(f"{model_pkg}:build", str(tmp_path / "missing.pt"))

    good = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict()
    w = tmp_path / "w.pt"
    torch.save({k: v for k, v in good.items() if k != "2.bias"}, w)
    with pytest.raises(ModelLoadError, match=r"missing keys '2\.bias'"):
        load_model(f"{model_pkg}:build", str(w))
    torch.save({**good, "extra.weight": torch.zeros(1)}, w)
    with pytest.raises(ModelLoadError, match=r"unexpected keys 'extra\.weight'"):
        load_model(f"{model_pkg}:build", str(w))
    torch.save({**good, "0.weight": torch.zeros(3, 4)}, w)
    with pytest.raises(ModelLoadError, match=r"shape mismatches 0\.weight"):
        load_model(f"{model_pkg}:build", str(w))
    torch.save(nn.Linear(2, 2), w)  # a pickled module, not a state_dict: refused by weights_only
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(f"{model_pkg}:build", str(w))
    # ModelLoadError is a ValueError
    assert issubclass(ModelLoadError, ValueError)
