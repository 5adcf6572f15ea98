"""Objective, selection and report (docs/methods.md): the seed-study vector, CLI, errors, report files."""

from __future__ import annotations

import argparse
import base64
import json
import math
from pathlib import Path

import pytest

from lowbit.report import format_table, pareto_front, plot_pareto, write_report
from lowbit.select import (
    Lambdas,
    add_select_arguments,
    choose,
    cli_select,
    objective,
    read_csv,
    score,
)

SEED_CSV = Path(__file__).resolve().parents[1] / "examples" / "seed_study.csv"

# docs/methods.md, "Choosing a method": L per variant, lowbit's sign and the seed study's printed sign
EXPECTED = {"U0-float": 0.00, "U1-dynamic": 0.39, "U2-static": 19.31, "U3-full-integer": 19.44,
            "U4-float16": -0.50}
EXPECTED_PAPER = dict(EXPECTED, **{"U1-dynamic": 0.21})


def _select_parser() -> argparse.ArgumentParser:
    return add_select_arguments(argparse.ArgumentParser(prog="lowbit select"))


def _run_cli(argv: list[str]) -> int:
    return cli_select(_select_parser().parse_args(argv))


def _write(tmp_path: Path, text: str, name: str = "r.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------ seed vector


@pytest.mark.parametrize("paper_sign, expected", [(False, EXPECTED), (True, EXPECTED_PAPER)])
def test_seed_vector_from_csv(paper_sign: bool, expected: dict[str, float]) -> None:
    rows = read_csv(SEED_CSV)
    assert [r["method"] for r in rows] == list(EXPECTED)
    scored = score(rows, paper_sign=paper_sign)
    got = {r["method"]: round(r["L"], 2) for r in scored}
    assert got == pytest.approx(expected, abs=1e-9)
    assert scored[0]["L"] == 0.0 and scored[0]["is_baseline"]
    assert not any(r["is_baseline"] for r in scored[1:])
    assert "note" in scored[0]  # extra columns kept
    best = choose(scored)
    assert best["method"] == "U4-float16"
    assert best["L"] == pytest.approx(-0.49625)


def test_objective_terms() -> None:
    # U1 by hand: size −0.739, time +1.043, accuracy ±0.090
    s, t, a = -(3200 - 834) / 3200, (47 - 23) / 23, (99.18 - 90.26) / 99.18
    assert objective(834, 47, 90.26, 3200, 23, 99.18, Lambdas()) == pytest.approx(s + t + a)
    assert objective(834, 47, 90.26, 3200, 23, 99.18, Lambdas(), paper_sign=True) == pytest.approx(s + t - a)
    lam = Lambdas(0.5, 1, 2)
    assert objective(834, 47, 90.26, 3200, 23, 99.18, lam) == pytest.approx(0.5 * s + t + 2 * a)
    for bad in [(0, 23, 99.18), (3200, -1, 99.18), (3200, 23, 0), (3200, 23, math.nan)]:
        with pytest.raises(ValueError, match="positive"):
            objective(834, 47, 90.26, *bad, Lambdas())


@pytest.mark.parametrize("paper_sign, u1", [(False, "0.39"), (True, "0.21")])
def test_cli_select_seed(capsys: pytest.CaptureFixture[str], paper_sign: bool, u1: str) -> None:
    argv = [str(SEED_CSV)] + (["--paper-sign"] if paper_sign else [])
    assert _run_cli(argv) == 0
    out = capsys.readouterr().out
    lines = {ln.lstrip("* ").split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert lines["U1-dynamic"].split()[7] == u1
    assert "19.31" in lines["U2-static"] and "19.44" in lines["U3-full-integer"]
    assert "-0.50" in lines["U4-float16"] and "← chosen" in lines["U4-float16"]
    assert lines["U4-float16"].startswith("*")
    assert "chosen: U4-float16 (L=-0.50)" in out.splitlines()


def test_cli_baseline_non_first_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = SEED_CSV.read_text(encoding="utf-8").splitlines()
    # move the float row to the end: without --baseline the first row (U1) would be the reference
    p = _write(tmp_path, "\n".join([text[0], *text[2:], text[1]]) + "\n")
    assert _run_cli([str(p), "--baseline", "U0-float"]) == 0
    out = capsys.readouterr().out
    assert "chosen: U4-float16 (L=-0.50)" in out
    scored = score(read_csv(p), baseline="U0-float")
    assert [r["is_baseline"] for r in scored] == [False] * 4 + [True]
    assert {r["method"]: round(r["L"], 2) for r in scored} == pytest.approx(EXPECTED)
    assert choose(scored)["method"] == "U4-float16"
    # the default baseline is the first row
    assert score(read_csv(p))[0]["L"] == 0.0


def test_cli_errors_return_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli([str(SEED_CSV), "--baseline", "nope"]) == 2
    assert "unknown baseline 'nope'" in capsys.readouterr().err
    assert _run_cli([str(SEED_CSV), "--lambdas", "1,1"]) == 2
    assert "three" in capsys.readouterr().err
    assert _run_cli([str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli([str(SEED_CSV), "--lambdas", "1,1,1", "--report", str(tmp_path / "rep")]) == 0
    assert "report:" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {
        "results.csv", "results.json", "pareto.png", "index.html"}


# ---------------------------------------------------------------------------------------- lambdas


def test_lambdas_parse() -> None:
    assert Lambdas.parse("1,1,1") == Lambdas()
    assert Lambdas.parse("0.5, 1, 2") == Lambdas(0.5, 1.0, 2.0)
    assert Lambdas.parse("0,0,1") == Lambdas(0, 0, 1)
    assert str(Lambdas(0.5, 1, 2)) == "0.5,1,2"


@pytest.mark.parametrize(
    "text, match",
    [
        ("1,1", "three"),
        ("1,1,1,1", "three"),
        ("", "three"),
        ("1,x,1", "not a number"),
        ("1,-1,1", "non-negative and not all zero"),
        ("0,0,0", "non-negative and not all zero"),
        ("1,inf,1", "finite"),
    ],
)
def test_lambdas_parse_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Lambdas.parse(text)


def test_lambdas_constructor_validates() -> None:
    with pytest.raises(ValueError, match="not all zero"):
        Lambdas(0, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        Lambdas(-1, 1, 1)


# ------------------------------------------------------------------------------- score and choose


def _rows() -> list[dict]:
    return read_csv(SEED_CSV)


def test_score_errors() -> None:
    with pytest.raises(ValueError, match="no result rows"):
        score([])
    rows = _rows()
    with pytest.raises(ValueError, match="unknown baseline 'fp32'"):
        score(rows, baseline="fp32")
    bad = [dict(r) for r in rows]
    del bad[2]["latency_ms"], bad[2]["accuracy"]
    with pytest.raises(ValueError, match="missing key.*latency_ms, accuracy"):
        score(bad)
    bad = [dict(r) for r in rows]
    bad[1]["accuracy"] = "ninety"
    with pytest.raises(ValueError, match="U1-dynamic.*accuracy.*not a finite number"):
        score(bad)
    bad = [dict(r) for r in rows]
    bad[3]["method"] = "U1-dynamic"
    with pytest.raises(ValueError, match="duplicate"):
        score(bad)


def test_score_keeps_input_and_extra_keys() -> None:
    rows = [{"method": "fp", "size_bytes": 100, "latency_ms": 10.0, "accuracy": 0.9, "backend": "torch"},
            {"method": "q", "size_bytes": "25", "latency_ms": 5, "accuracy": 0.9, "threads": 4}]
    scored = score(rows, lambdas="1,1,1")
    assert "L" not in rows[0] and "L" not in rows[1]  # inputs untouched
    assert scored[0]["backend"] == "torch" and scored[1]["threads"] == 4
    assert scored[1]["L"] == pytest.approx(-0.75 - 0.5)


def test_choose_ties_and_baseline() -> None:
    base = {"method": "fp", "size_bytes": 100, "latency_ms": 10, "accuracy": 90}
    a = {"method": "a", "size_bytes": 50, "latency_ms": 15, "accuracy": 90}   # L = -0.5 + 0.5 = 0
    b = {"method": "b", "size_bytes": 40, "latency_ms": 16, "accuracy": 90}   # L = -0.6 + 0.6 = 0
    c = {"method": "c", "size_bytes": 40, "latency_ms": 16, "accuracy": 90}   # same as b
    scored = score([base, a, b, c])
    assert [round(r["L"], 12) for r in scored] == [0, 0, 0, 0]
    assert choose(scored)["method"] == "b"  # tie on L -> smaller file; then first
    # every quantized model worse than float: default still picks a quantized one ...
    worse = score([base, {"method": "slow", "size_bytes": 90, "latency_ms": 30, "accuracy": 80}])
    best = choose(worse)
    assert best["method"] == "slow" and best["L"] > 0 and not best["is_baseline"]
    # ... include_baseline lets the float model win
    best = choose(worse, include_baseline=True)
    assert best["method"] == "fp" and best["is_baseline"]
    # but not when a quantized one is at least as good
    assert choose(scored, include_baseline=True)["method"] == "b"
    with pytest.raises(ValueError, match="only the baseline"):
        choose(score([base]))
    with pytest.raises(ValueError, match="score"):
        choose([base, a])


# ------------------------------------------------------------------------------------------- CSV


def test_read_csv_missing_columns(tmp_path: Path) -> None:
    p = _write(tmp_path, "method,size_bytes,note\nfp,100,x\n")
    with pytest.raises(ValueError, match="missing required column.*latency_ms, accuracy"):
        read_csv(p)


def test_read_csv_bad_number_names_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "method,size_bytes,latency_ms,accuracy\nfp,100,10,90\n\nq,25,fast,89\n")
    with pytest.raises(ValueError, match=r"line 4: column 'latency_ms' is not a number: 'fast'"):
        read_csv(p)


def test_read_csv_extras_and_empty(tmp_path: Path) -> None:
    p = _write(tmp_path, "\ufeffmethod, size_bytes ,latency_ms,accuracy,backend\nfp,100,10,90%,torch\n")
    (row,) = read_csv(p)
    assert row == {"method": "fp", "size_bytes": 100, "latency_ms": 10.0, "accuracy": 90.0,
                   "backend": "torch"}
    with pytest.raises(ValueError, match="no data rows"):
        read_csv(_write(tmp_path, "method,size_bytes,latency_ms,accuracy\n", "h.csv"))
    with pytest.raises(ValueError, match="empty file"):
        read_csv(_write(tmp_path, "", "e.csv"))


# ---------------------------------------------------------------------------------------- report


def test_pareto_front_hand_example() -> None:
    rows = [
        {"method": "A", "latency_ms": 10, "accuracy": 90, "size_bytes": 100},
        {"method": "B", "latency_ms": 5, "accuracy": 85, "size_bytes": 100},   # fastest
        {"method": "C", "latency_ms": 12, "accuracy": 89, "size_bytes": 120},  # dominated by A
        {"method": "D", "latency_ms": 20, "accuracy": 88, "size_bytes": 10},   # smallest
        {"method": "E", "latency_ms": 10, "accuracy": 90, "size_bytes": 100},  # equal to A: both stay
        {"method": "F", "latency_ms": 10, "accuracy": 90, "size_bytes": 101},  # dominated by A (size)
    ]
    assert pareto_front(rows) == ["A", "B", "D", "E"]
    assert pareto_front(rows, include_size=False) == ["A", "B", "E", "F"]
    # the seed study: float16 dominates float; full integer is dominated by static
    assert pareto_front(_rows()) == ["U1-dynamic", "U2-static", "U4-float16"]


def test_format_table_marks_and_optional_columns() -> None:
    rows = score([
        {"method": "fp32", "size_bytes": 2048, "latency_ms": 2.0, "accuracy": 0.95, "backend": "torch",
         "threads": 1},
        {"method": "int8", "size_bytes": 512, "latency_ms": 1.0, "accuracy": 0.94, "backend": "native",
         "threads": 1, "note": "per-channel"},
    ])
    text = format_table(rows, "int8")
    lines = text.splitlines()
    assert "backend" in lines[0] and "threads" in lines[0] and "note" in lines[0]
    assert "batch_size" not in lines[0]
    fp, q = lines[2], lines[3]
    assert fp.startswith("  fp32") and "(baseline)" in fp and "95.00" in fp
    assert q.startswith("* int8") and q.endswith("← chosen") and "0.25×" in q and "-1.00" in q
    assert "0.50×" in q  # latency ratio
    end = lines[0].index("ΔA pp") + len("ΔA pp")  # right-aligned numeric columns
    assert fp.index("+0.00") + 5 == end and q.index("-1.00") + 5 == end
    with pytest.raises(ValueError, match="not among"):
        format_table(rows, "int4")
    assert "backend" not in format_table(rows, None, columns=["threads"]).splitlines()[0]


def test_write_report(tmp_path: Path) -> None:
    scored = score(_rows(), lambdas=Lambdas(1, 1, 1))
    # put the baseline last in the input: the CSV must still list it first
    rows = scored[1:] + scored[:1]
    meta = {"model": "MobileNet <v1>", "dataset": "garbage & co", "machine": "Xeon", "threads": 1,
            "batch_size": 1, "backend": "tflite", "date": "2024-01-01"}
    paths = write_report(rows, tmp_path / "out", "U4-float16", Lambdas(0.5, 1, 2), meta)
    assert set(paths) == {"csv", "json", "png", "html"}
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]

    csv_rows = read_csv(paths["csv"])
    assert csv_rows[0]["method"] == "U0-float"
    assert [r["method"] for r in csv_rows[1:]] == [r["method"] for r in scored[1:]]
    assert float(csv_rows[2]["L"]) == pytest.approx(scored[2]["L"])

    doc = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert doc["meta"] == meta
    assert doc["lambdas"] == {"size": 0.5, "time": 1.0, "acc": 2.0}
    assert doc["chosen"] == "U4-float16"
    assert doc["results"][0]["method"] == "U0-float"
    assert sorted(doc["results"], key=lambda r: r["method"]) == sorted(
        json.loads(json.dumps(scored)), key=lambda r: r["method"])

    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    page = paths["html"].read_text(encoding="utf-8")
    assert '<img src="data:image/png;base64,' in page
    b64 = page.split('<img src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(b64) == png
    assert "U4-float16" in page and "chosen" in page
    assert "MobileNet &lt;v1&gt;" in page and "garbage &amp; co" in page and "<v1>" not in page
    assert "0.5·(S − S0)/S0 + 1·(T − T0)/T0 + 2·(A0 − A)/A0" in page
    for v in ("Xeon", "tflite", "2024-01-01", "batch size"):
        assert v in page


def test_write_report_rejects_unknown_chosen(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not among"):
        write_report(score(_rows()), tmp_path, "U9", Lambdas(), {})


def test_plot_pareto_fraction_accuracy(tmp_path: Path) -> None:
    rows = [{"method": "fp", "size_bytes": 4000, "latency_ms": 0.8, "accuracy": 0.91},
            {"method": "int8", "size_bytes": 1000, "latency_ms": 0.3, "accuracy": 0.905}]
    p = plot_pareto(rows, tmp_path / "sub" / "p.png", chosen="int8", title="t")
    assert p.read_bytes().startswith(b"\x89PNG")


def test_lowbit_compare_stays_callable_after_the_module_is_imported():
    """``import lowbit.compare`` puts the submodule on the package; ``lowbit.compare(...)`` must still be
    the function (a fresh interpreter, so the import order is the user's)."""
    import subprocess
    import sys

    code = ("import lowbit, lowbit.compare\n"
            "from lowbit.compare import CompareResult\n"
            "assert callable(lowbit.compare), type(lowbit.compare)\n"
            "try:\n    lowbit.compare()\n"
            "except TypeError as e:\n    assert 'eval_fn' in str(e) or 'model' in str(e), e\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
