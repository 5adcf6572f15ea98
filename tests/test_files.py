"""lowbit.files (issue 6/7): atomic writes with the umask's modes, inputs never overwritten, and the
report written as a folder that an interruption cannot leave half new, half stale."""

from __future__ import annotations

import os
import stat

import pytest

from lowbit import files
from lowbit.report import write_report
from lowbit.select import Lambdas, score


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_new_files_get_the_umask_mode(tmp_path, umask_027):
    """Not mkstemp's 0600: a new file is 0666 & ~umask; a replaced file keeps its mode."""
    p = files.write_text(tmp_path / "a" / "b.txt", "hi")
    assert p.read_text() == "hi" and _mode(p) == 0o640
    os.chmod(p, 0o604)
    files.write_bytes(p, b"again")
    assert p.read_bytes() == b"again" and _mode(p) == 0o604
    assert sorted(os.listdir(p.parent)) == ["b.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    p = files.write_text(tmp_path / "x.json", "old")

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_stream(p, boom)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]


def test_inputs_and_folders_are_refused(tmp_path):
    src = tmp_path / "model.pt"
    src.write_bytes(b"weights")
    with pytest.raises(files.OutputError, match="input"):
        files.write_bytes(src, b"x", inputs=[src])
    with pytest.raises(files.OutputError, match="input"):
        files.write_bytes(tmp_path / "." / "model.pt", b"x", inputs=[str(src)])
    assert src.read_bytes() == b"weights"
    with pytest.raises(files.OutputError, match="is a folder"):
        files.write_bytes(tmp_path, b"x")
    with pytest.raises(files.OutputError, match="not a folder"):
        files.check_output(src, folder=True)
    with pytest.raises(files.OutputError, match="not a folder"):
        files.check_output(src / "sub" / "out.lowbit")
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def _rows():
    return score([
        {"method": "float", "size_bytes": 1000, "latency_ms": 2.0, "accuracy": 99.0},
        {"method": "static", "size_bytes": 260, "latency_ms": 1.0, "accuracy": 98.8},
    ], "float", Lambdas())


def test_report_is_one_folder_swap(tmp_path, umask_027, monkeypatch):
    out = tmp_path / "report"
    write_report(_rows(), out, "static", Lambdas(), {"model": "m1"})
    (out / "chosen.lowbit").write_bytes(b"user file")  # not part of the report: kept
    old = {n: (out / n).read_bytes() for n in ("results.csv", "results.json", "index.html", "pareto.png")}
    assert all(_mode(out / n) == 0o640 for n in old) and _mode(out) == 0o750

    import lowbit.report as report

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C while the report is being written

    monkeypatch.setattr(report, "_html_page", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(_rows(), out, "float", Lambdas(2, 1, 1), {"model": "m2"})
    assert {n: (out / n).read_bytes() for n in old} == old  # all old, none new
    assert sorted(os.listdir(tmp_path)) == ["report"]  # no temporary folder left
    monkeypatch.undo()
    write_report(_rows(), out, "float", Lambdas(2, 1, 1), {"model": "m2"})
    assert b"m2" in (out / "results.json").read_bytes() and b"m2" in (out / "index.html").read_bytes()
    assert (out / "chosen.lowbit").read_bytes() == b"user file"
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_report_folder_must_be_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(files.OutputError, match="current folder"):
        write_report(_rows(), ".", "static", Lambdas(), {})
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(files.OutputError, match="not a folder"):
        write_report(_rows(), f, "static", Lambdas(), {})


def test_model_files_and_checkpoints_get_the_umask_mode(tmp_path, umask_027):
    import torch
    from torch import nn

    import lowbit
    from lowbit.graph import prepare
    from lowbit.train import save_checkpoint

    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    p = lowbit.save(prepare(m, torch.zeros(1, 4)).gm, tmp_path / "m.lowbit")
    c = save_checkpoint(tmp_path / "c.pt", m, {"model": "x", "in_channels": 1, "num_classes": 2, "input_size": 2})
    assert _mode(p) == 0o640 and _mode(c) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "m.lowbit"]
