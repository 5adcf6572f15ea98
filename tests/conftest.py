import pytest
import torch

_ISA_RANK = {"portable": 0, "neon": 1, "avx2": 2, "avx512bw": 3, "vnni": 4}


@pytest.fixture(params=["portable", "avx2", "avx512bw", "vnni", "torch"])
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Every native dispatch path this CPU runs (capped for this thread), and the plain-PyTorch fallback
    ("torch", ``LOWBIT_KERNELS=torch``). Paths the CPU lacks are skipped with the reason; the AVX-512 ones
    also run under emulation (tests/test_emulation.py)."""
    if request.param == "torch":
        monkeypatch.setenv("LOWBIT_KERNELS", "torch")
        yield "torch"
        return
    try:
        from lowbit import _native as nat
    except ImportError:  # pragma: no cover - depends on the build
        pytest.skip("lowbit._native is not built")
    best = nat.best_isa()
    if request.param != "portable" and (best == "neon" or _ISA_RANK[request.param] > _ISA_RANK[best]):
        pytest.skip(f"this CPU cannot run the {request.param} path (best ISA here: {best})")
    prev = nat.set_thread_isa_cap(request.param)
    try:
        yield request.param
    finally:
        nat.set_thread_isa_cap(prev)


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory):
    """The small CNN trained on digits (default recipe), and its splits. Trained once per worker."""
    from lowbit.train import train_or_load

    ckpt = tmp_path_factory.mktemp("ckpt") / "small_cnn-digits.pt"
    torch.manual_seed(0)
    model, splits, meta = train_or_load("small_cnn", "digits", checkpoint=ckpt, progress=False)
    return model.eval(), splits, meta


@pytest.fixture(scope="session")
def digits_quantized(digits_cnn):
    """The digits CNN quantized by every post-training mode (calibration: the 500-sample calibration split)."""
    import lowbit

    model, splits, _ = digits_cnn
    modes = ("dynamic", "static", "full_integer", "float16")
    out = {m: lowbit.quantize(model, m, calib=splits.calib) for m in modes}
    out["full_integer_int8"] = lowbit.quantize(model, "full_integer", calib=splits.calib, io_dtype="int8")
    return out


@pytest.fixture(scope="session")
def residual_models(digits_cnn):
    """ResNet-20 and the MobileNet (width 8, 8x8 digits) with realistic BatchNorm statistics, each with its
    static quantization (calibration: 200 samples); also returns the calibration tensor."""
    import lowbit
    from lowbit.models import build

    _, splits, _ = digits_cnn
    calib = splits.calib.tensors[0][:200]
    out = {}
    for name in ("resnet20", "mobilenet"):
        torch.manual_seed(0)
        model = build(name, 1, 10, 8)
        model.train()
        with torch.no_grad():
            model(splits.train.tensors[0][:256])
        model.eval()
        out[name] = (lowbit.quantize(model, "static", calib=calib), model)
    return out, calib


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread (small nets slow down ~10x when the 2 test workers' OpenMP
    threads oversubscribe a busy machine); restores the setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
