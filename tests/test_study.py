"""The study framework and ``lowbit study init --quick``."""

import json

import pytest

import lowbit
from lowbit.cli import main
from lowbit.study import STUDIES
from lowbit.study.core import Results, curve_ylim, epochs_to_target, fmt_mean_std, mean_std, run_grid
from lowbit.study.kinds.init import own_init_key
from lowbit.study.registry import discover

pytestmark = pytest.mark.usefixtures("one_thread")


def test_statistics_by_hand(tmp_path):
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (n - 1)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert fmt_mean_std([99.0, 99.5]) == "99.25 ± 0.35"
    curve = [(0.0, 97.0), (0.1, 98.4), (0.2, 98.6), (0.3, 98.2)]
    assert epochs_to_target(curve, 98.5) == 0.2 and epochs_to_target(curve, 99.0) is None
    r = Results(tmp_path / "r.jsonl", {"a": 1})
    r.add({"id": {"seed": 0}, "x": 1})
    assert Results(tmp_path / "r.jsonl", {"a": 1}).done({"seed": 0})["x"] == 1
    with pytest.raises(ValueError, match="another study setup"):
        Results(tmp_path / "r.jsonl", {"a": 2})
    again = Results(tmp_path / "r.jsonl", {"a": 1})
    recs = run_grid([{"seed": 0}, {"seed": 1}], lambda rid: {"x": 10 + rid["seed"]}, again, progress=False)
    assert [r["x"] for r in recs] == [1, 11] and again.resumed == 1  # seed 0 came from the file


def test_curve_axis_shows_where_every_curve_ends():
    # zoom: the lowest of the upper three quarters (95) minus 0.5, the highest point plus 0.3
    assert curve_ylim([[90.0, 95.0, 96.0, 97.0, 98.0]]) == pytest.approx((94.5, 98.3))
    # a curve that falls (gradual freezing): its last point stays on the axis, and so does the target
    assert curve_ylim([[97.0, 94.0, 93.0, 89.0, 87.5]]) == pytest.approx((87.0, 97.3))
    assert curve_ylim([[97.0, 98.0]], target=90.0) == pytest.approx((89.5, 98.3))


def test_kinds_are_discovered():
    assert "init" in discover() and STUDIES["init"].name == "init"


def test_own_initializer_of_a_method_in_the_comparison():
    assert own_init_key("lsq", ["own", "mse"]) == "own"  # 'own' stands for each method's own initializer
    assert own_init_key("lsq_plus", ["lsq_plus", "mse"]) == "lsq_plus"
    assert own_init_key("apot", ["lsq", "mse"]) is None  # apot's own ('apot') was not run


def test_study_init_quick(digits_cnn, tmp_path, capsys):
    model, _, meta = digits_cnn
    ck = tmp_path / "float.pt"
    lowbit.train.save_checkpoint(ck, model, meta)
    out = tmp_path / "res" / "init.md"
    argv = ["study", "init", "--quick", "--checkpoint", str(ck), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = out.read_text()
    assert "lowbit study init --quick" in text and "CPU:" in text and "wall time" in text
    assert "| lsq | lsq |" in text and "| lsq | mse |" in text and "Adaptive `mse` init" in text
    assert (tmp_path / "res" / "init-w4a4-lsq.png").stat().st_size > 1000
    lines = (tmp_path / "res" / "init.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    assert len(recs) == 4 and all(r["agreement"] >= 99.5 and len(r["curve"]) >= 3 for r in recs)
    before = (tmp_path / "res" / "init.jsonl").read_text()
    assert "4 runs (0 taken from the results file" in text and "load average" in text
    assert main(argv) == 0  # every run is in the results file: nothing is trained again
    assert (tmp_path / "res" / "init.jsonl").read_text() == before
    assert "4 runs (4 taken from the results file" in out.read_text()
    assert main(["study", "init", "--quick", "--inits", "lsq,golden", "--out", str(out)]) == 2
    assert "unknown initializer" in capsys.readouterr().err


@pytest.mark.parametrize("device, why", [("gpu", "must be cpu, cuda or cuda:N"), ("cuda:x", "must be cpu, cuda"),
                                         ("cuda:99", "no such CUDA device")])
def test_study_device_is_checked_before_any_work(tmp_path, capsys, device, why):
    out = tmp_path / "init.md"
    assert main(["study", "init", "--quick", "--device", device, "--out", str(out)]) == 2
    assert why in capsys.readouterr().err and not out.exists() and not (tmp_path / "init.jsonl").exists()
