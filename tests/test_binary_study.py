"""``lowbit study binary --quick``: both methods trained, converted and reported; the results file is reused."""

import json

import pytest

import lowbit
from lowbit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_study_binary_quick(digits_cnn, tmp_path, capsys):
    model, _, meta = digits_cnn
    ck = tmp_path / "float.pt"
    lowbit.train.save_checkpoint(ck, model, meta)
    out = tmp_path / "res" / "binary.md"
    argv = ["study", "binary", "--quick", "--seeds", "1", "--checkpoint", str(ck), "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    text = out.read_text()
    assert "lowbit study binary --quick" in text and "CPU:" in text and "wall time" in text
    assert "| small_cnn | " in text and "| binary_ste |" in text and "| ubq |" in text
    assert "UBQ higher mean" in text and (tmp_path / "res" / "binary-small_cnn.png").stat().st_size > 1000
    lines = (tmp_path / "res" / "binary.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    assert [r["id"]["method"] for r in recs] == ["binary_ste", "ubq"]
    assert all(r["agreement"] >= 99.5 and len(r["curve"]) >= 2 for r in recs)
    assert recs[0]["stages"] is None and recs[1]["stages"] == 5  # binary_ste all at once, ubq gradual
    assert all(r["int_acc"] > 30 for r in recs)  # trained: far above chance (10%)
    before = (tmp_path / "res" / "binary.jsonl").read_text()
    assert main(argv) == 0  # every run is in the results file: nothing is trained again
    assert (tmp_path / "res" / "binary.jsonl").read_text() == before
    assert main(["study", "binary", "--quick", "--methods", "binary_ste,lsq", "--out", str(out)]) == 2
    assert "not a binary-network method" in capsys.readouterr().err
    assert main(["study", "binary", "--models", "small_cnn,tiny_cnn", "--checkpoint", str(ck), "--out",
                 str(out)]) == 2
    assert "single --models" in capsys.readouterr().err
