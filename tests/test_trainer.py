"""lowbit's trainer: determinism, checkpoints and resume, sub-epoch evaluation, bad input, distributed
training (2 CPU processes under torchrun), and the training-aware methods in quantize / compare / CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.trainer import FitOptions, fit, load_fit_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
HELPERS = Path(__file__).parent / "helpers"


def _qat(digits_cnn, method="lsq", **kw):
    model, splits, _ = digits_cnn
    torch.manual_seed(0)
    return lowbit.qat.prepare(model, method, calib=splits.calib, bits=(4, 4), **kw)


def _opts(**kw):
    base = {"epochs": 0.3, "batch_size": 32, "progress": False, "eval_every": 0.1}
    return FitOptions(**{**base, **kw})


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_deterministic_resume_and_sub_epoch_evaluation(digits_cnn, tmp_path):
    _, splits, _ = digits_cnn
    full = _qat(digits_cnn)
    r_full = fit(full, splits.train, splits.test, _opts(), meta={"method": "lsq"})
    steps = r_full.steps
    assert steps == round(0.3 * r_full.steps_per_epoch) and len(r_full.history) >= 3
    assert [round(r["epoch"], 2) for r in r_full.history][:2] == [round(round(0.1 * 34) / 34, 2),
                                                                  round(round(0.2 * 34) / 34, 2)]
    again = _qat(digits_cnn)
    fit(again, splits.train, splits.test, _opts(), meta={"method": "lsq"})
    assert _same(full, again)  # same seed, same threads: bit for bit
    other = _qat(digits_cnn)
    fit(other, splits.train, splits.test, _opts(seed=1), meta={"method": "lsq"})
    assert not _same(full, other)
    ck = tmp_path / "run.pt"
    part = _qat(digits_cnn)
    r1 = fit(part, splits.train, splits.test, _opts(checkpoint=ck, max_steps=4), meta={"method": "lsq"})
    assert r1.steps == 4 and load_fit_checkpoint(ck)["step"] == 4 and not list(tmp_path.glob("*.tmp"))
    resumed = _qat(digits_cnn)  # a fresh process would rebuild the model the same way
    r2 = fit(resumed, splits.train, splits.test, _opts(checkpoint=ck, resume=True), meta={"method": "lsq"})
    assert r2.resumed_from == 4 and r2.steps == steps
    assert _same(full, resumed)  # the interrupted run ends exactly where the uninterrupted one did


def test_resume_refuses_another_run_and_bad_input(digits_cnn, tmp_path):
    _, splits, _ = digits_cnn
    ck = tmp_path / "run.pt"
    fit(_qat(digits_cnn), splits.train, None, _opts(checkpoint=ck, max_steps=1), meta={"method": "lsq"})
    with pytest.raises(ValueError, match="another method"):
        fit(_qat(digits_cnn, "lsq_plus"), splits.train, None, _opts(checkpoint=ck, resume=True),
            meta={"method": "lsq_plus"})
    other_model = lowbit.qat.prepare(lowbit.models.build("resnet20", 1, 10, 8), "lsq", calib=splits.calib)
    with pytest.raises(ValueError, match="another fingerprint"):
        fit(other_model, splits.train, None, _opts(checkpoint=ck, resume=True), meta={"method": "lsq"})
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        fit(_qat(digits_cnn), splits.train, None, _opts(checkpoint=ck, resume=True), meta={"method": "lsq"})
    x, y = splits.train.tensors
    bad = (torch.where(torch.rand_like(x) < 0.5, float("nan"), x), y)
    with pytest.raises(FloatingPointError, match="diverged at step 1"):
        fit(_qat(digits_cnn), bad, None, _opts())
    with pytest.raises(ValueError, match="empty"):
        fit(_qat(digits_cnn), (x[:0], y[:0]), None, _opts())
    with pytest.raises(ValueError, match="resume needs"):
        FitOptions(resume=True)


def test_distributed_training_keeps_ranks_identical(tmp_path):
    """torchrun --nproc_per_node 2, gloo on CPU: each rank initializes on other calibration data, trains on
    its shard; both must hold the same quantizer parameters at the start (rank 0's init broadcast) and end."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HELPERS / "ddp_qat_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    q = [k for k in r0["final"] if "quantizer" in k or k.startswith("aq_")]
    assert any(k.endswith("step.step") for k in q) and any(k.endswith("beta") for k in q)
    for k in r0["final"]:
        assert torch.equal(r0["init"][k], r1["init"][k]), k
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    assert sum(not torch.equal(r0["init"][k], r0["final"][k]) for k in q) >= len(q) // 2  # it trained
    assert r0["history"] == r1["history"] and r0["steps"] > 0


def test_training_methods_in_quantize_and_compare(digits_cnn, tmp_path):
    model, splits, _ = digits_cnn
    with pytest.raises(ValueError, match="train="):
        lowbit.quantize(model, "lsq", calib=splits.calib)
    res = lowbit.compare(model, splits.calib, lambda m: lowbit.evaluate.accuracy(m, splits.test),
                         methods=["static", "lsq"], train=splits.train, repeats=1, report_dir=None, progress=False,
                         configs={"lsq": lowbit.methods.LSQConfig(epochs=0.1, progress=False, threads=1)})
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == {"float", "static", "lsq"} and rows["lsq"]["accuracy"] > 90
    assert rows["lsq"]["size_bytes"] < rows["static"]["size_bytes"]  # 4-bit weights stored at 4 bits
    with pytest.raises(ValueError, match="trains the model"):
        lowbit.compare(model, splits.calib, lambda m: 0.0, methods=["lsq"], report_dir=None)


def test_cli_qat(digits_cnn, tmp_path, capsys):
    model, _, meta = digits_cnn
    ck = tmp_path / "float.pt"
    lowbit.train.save_checkpoint(ck, model, meta)
    run = tmp_path / "run.pt"
    argv = ["qat", "small_cnn", "--checkpoint", str(ck), "--method", "lsq", "--bits", "3,3", "--epochs", "0.2",
            "--init", "mse", "--train-threads", "1", "--repeats", "1", "--compare-with", "none",
            "--run-checkpoint", str(run), "--out", str(tmp_path / "q.lowbit"), "--report-dir", str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "same prediction on 100.00%" in out or "same prediction on 99." in out
    assert (tmp_path / "q.lowbit").is_file() and (tmp_path / "r" / "index.html").is_file() and run.is_file()
    assert lowbit.load(tmp_path / "q.lowbit").lowbit_meta["method"] == "lsq"
    assert main([*argv, "--resume"]) == 0  # resumes at the end: nothing left to train, same model
    assert main([*argv[:5], "static", *argv[6:]]) == 2
    assert "not training-aware" in capsys.readouterr().err
    bad_bits = [*argv]
    bad_bits[7] = "9,4"
    assert main(bad_bits) == 2
    assert main([*argv, "--resume", "--run-checkpoint", str(tmp_path / "missing.pt")]) == 2


@pytest.mark.parametrize("device, why", [("gpu", "must be cpu, cuda or cuda:N"), ("cuda:99", "no such CUDA device")])
def test_cli_qat_device_is_checked_before_any_work(tmp_path, capsys, device, why):
    out = tmp_path / "q.lowbit"
    argv = ["qat", "small_cnn", "--data", "digits", "--device", device, "--out", str(out),
            "--run-checkpoint", str(tmp_path / "run.pt"), "--report-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    assert why in capsys.readouterr().err and not any(tmp_path.iterdir())
