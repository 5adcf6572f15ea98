"""``lowbit study adapt``: iterative adaptation to quantization noise against post-training quantization and QAT.

For every bit width × method × seed, from the trained float model and an unlabelled calibration set drawn
from the training images with the seed:

* ``ptq``: plain post-training quantization at the bit width: every step from the float network at once,
  the observer (``--observers``) whose quantized network has the lowest output MSE against the float one on
  the calibration set (no labels, no test data in the choice);
* ``correct``: the same steps (``mse`` observer), then the layer-wise correction of the 4.6-bit pipeline
  (:func:`lowbit.qat.layerwise.correct_layers`: per-layer output MSE, ``--correct-steps`` Adam steps each);
* ``adapt_all``, ``adapt_K``: ``adapt`` with window = every later layer, or the next K (``--windows``);
* ``lsq_equal``: LSQ quantization-aware training on the labelled training set for as many samples as
  ``adapt`` with window = all pushes through the network at most (``(layers - 1) × steps × adapt batch``);
* ``lsq_long``: LSQ for ``--qat-epochs`` (at the bit widths of ``--qat-long``), evaluated every
  ``--eval-every`` epoch, to measure the training time QAT needs to reach ``adapt``'s accuracy.

Every accuracy is the converted integer model's (lowbit's kernels) on the full test set, except the points
of ``lsq_long``'s curve (the fake-quant model, evaluated while it trains). Wall times cover everything that
makes the integer model (preparation, calibration, training, conversion), not the evaluation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.cliargs import positive_float, positive_int
from lowbit.study.core import (
    Results,
    add_common_arguments,
    add_model_arguments,
    fmt_mean_std,
    load_float,
    markdown_table,
    mean_std,
    plot_curves,
    run_grid,
    split_list,
    write_markdown,
)
from lowbit.study.registry import StudyKind, register_study

_DEFAULT_OBSERVERS = "minmax,percentile,mse,aciq_laplace"


def _windows(text: str) -> list[int | None]:
    out: list[int | None] = []
    for t in split_list(text):
        if t.lower() == "all":
            out.append(None)
        elif t.isdigit() and int(t) >= 1:
            out.append(int(t))
        else:
            raise ValueError(f"--windows takes 'all' and layer counts >= 1, got {t!r}")
    return out


def _patience(text: str) -> int | None:
    return None if text.strip().lower() == "none" else positive_int(text)


def _first_last(text: str) -> int | None:
    if text.strip().lower() in ("none", "same"):
        return None
    return int(text)


@register_study
class AdaptStudy(StudyKind):
    name = "adapt"
    help = "iterative adaptation (adapt, windows) against plain PTQ, layer-wise correction and LSQ: accuracy, time"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, "tiny_cnn")
        p.add_argument("--bits", nargs="+", default=["4,4", "6,6", "8,8"], metavar="W,A",
                       help="bit widths (default 4,4 6,6 8,8)")
        p.add_argument("--first-last-bits", default="none", type=_first_last,
                       help="bits of the first and last layer for every method ('none': the same as the others; "
                            "default none, so the small net loses points at 4 bits)")
        p.add_argument("--windows", default="1,2", help="adapt windows: 'all' and layer counts (default 1,2)")
        p.add_argument("--steps", type=positive_int, default=50, help="adapt steps per layer, at most (default 50)")
        p.add_argument("--lr", type=positive_float, default=3e-3, help="adapt learning rate (default 3e-3)")
        p.add_argument("--batch-size", type=positive_int, default=64, help="LSQ and correction batch size (default 64)")
        p.add_argument("--adapt-batch-size", type=positive_int, default=32, help="adapt batch size (default 32)")
        p.add_argument("--patience", type=_patience, default=1,
                       help="adapt: stop a layer's training after this many held-out checks without improvement "
                            "('none': never; default 1)")
        p.add_argument("--check-every", type=positive_int, default=10,
                       help="adapt: steps between held-out checks (default 10)")
        p.add_argument("--no-safeguard", action="store_true",
                       help="adapt: keep every adaptation, even one that raises the held-out output MSE")
        p.add_argument("--calib-samples", type=positive_int, default=2048,
                       help="unlabelled calibration samples drawn from the training set (default 2048)")
        p.add_argument("--observers", default=_DEFAULT_OBSERVERS,
                       help=f"observers plain PTQ chooses from (default {_DEFAULT_OBSERVERS})")
        p.add_argument("--correct-steps", type=positive_int, default=300,
                       help="layer-wise correction steps per layer (default 300)")
        p.add_argument("--qat-init", default="mse", help="LSQ step initializer (default mse)")
        p.add_argument("--qat-lr", type=positive_float, default=1e-3, help="LSQ learning rate (default 1e-3)")
        p.add_argument("--qat-epochs", type=positive_float, default=2.0,
                       help="epochs of the long LSQ run (default 2)")
        p.add_argument("--qat-equal", nargs="*", default=None, metavar="W,A",
                       help="bit widths that get the equal-samples LSQ run (default: every one of --bits)")
        p.add_argument("--qat-long", nargs="*", default=["4,4"], metavar="W,A",
                       help="bit widths that get the long LSQ run (default 4,4)")
        p.add_argument("--eval-every", type=positive_float, default=0.05,
                       help="evaluation interval of the long LSQ run, in epochs (default 0.05)")
        add_common_arguments(p, "report/study-adapt.md")

    # -------------------------------------------------------------------------------------------
    def run(self, args: argparse.Namespace) -> int:
        from lowbit.methods.qat import parse_bits
        from lowbit.observers import OBSERVERS
        from lowbit.quantizers import INITIALIZERS

        if args.quick:  # small data, one seed, few steps; the methods stay
            args.data, args.model, args.bits, args.qat_long = "digits", "small_cnn", ["4,4"], ["4,4"]
            args.seeds, args.steps, args.correct_steps, args.calib_samples = 1, 5, 5, 256
            args.qat_epochs, args.eval_every, args.observers = 0.2, 0.1, "minmax,mse"
        bits = [parse_bits(b) for b in args.bits]
        long_bits = {parse_bits(b) for b in args.qat_long}
        equal_bits = set(bits) if args.qat_equal is None else {parse_bits(b) for b in args.qat_equal}
        windows = _windows(args.windows)
        observers = split_list(args.observers)
        for o in observers:
            if o not in OBSERVERS:
                raise ValueError(f"unknown observer {o!r}; known: {', '.join(sorted(OBSERVERS))}")
        if args.qat_init not in INITIALIZERS:
            raise ValueError(f"unknown --qat-init {args.qat_init!r}; known: {', '.join(sorted(INITIALIZERS))}")
        for b in bits:  # bit widths and options outside adapt's range fail before any work
            _adapt_config(b, args)
        for name, chosen in (("--qat-long", long_bits), ("--qat-equal", equal_bits)):
            if not chosen <= set(bits):
                raise ValueError(f"{name} bit widths {sorted(chosen - set(bits))} are not in --bits")
        out = Path(args.out)
        t0 = time.perf_counter()
        load0 = _load()
        model, splits, float_acc = load_float(args)
        key = {"study": "adapt", "model": args.model, "data": splits.name, "float_acc": float_acc,
               "first_last_bits": args.first_last_bits, "steps": args.steps, "lr": args.lr,
               "batch_size": args.batch_size, "adapt_batch_size": args.adapt_batch_size,
               "calib_samples": args.calib_samples, "observers": observers,
               "safeguard": not args.no_safeguard, "patience": args.patience, "check_every": args.check_every,
               "correct_steps": args.correct_steps, "qat_init": args.qat_init, "qat_lr": args.qat_lr,
               "qat_epochs": args.qat_epochs, "eval_every": args.eval_every,
               **({"device": args.device} if args.device != "cpu" else {})}  # CPU results files stay valid
        results = Results(args.results or out.with_suffix(".jsonl"), key)
        methods = ["ptq", "correct", *(_adapt_name(w) for w in windows), "lsq_equal", "lsq_long"]
        runs = [{"bits": list(b), "method": m, "seed": s} for b in bits for m in methods
                for s in range(args.seeds)
                if (m != "lsq_long" or b in long_bits) and (m != "lsq_equal" or b in equal_bits)]
        records = run_grid(runs, lambda rid: _one_run(rid, model, splits, args), results,
                           progress=not args.no_progress,
                           label=lambda r: f"W{r['bits'][0]}A{r['bits'][1]} {r['method']} s{r['seed']}")
        body = _report(records, bits, methods, float_acc, args, out)
        load = f"load average {load0} at the start, {_load()} at the end (2 cores shared with other work)"
        write_markdown(out, "Iterative adaptation to quantization noise (`lowbit study adapt`)", args,
                       time.perf_counter() - t0, body, notes=[f"Machine: {load}.", ""])
        print(f"study written to {out}")
        return 0


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def _adapt_name(window: int | None) -> str:
    return "adapt_all" if window is None else f"adapt_{window}"


# ------------------------------------------------------------------------------------------- runs

def _calib(splits: Any, n: int, seed: int) -> torch.Tensor:
    x = splits.train.tensors[0]
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(len(x), generator=g)[:n]]


def _one_run(rid: dict[str, Any], model: torch.nn.Module, splits: Any, args: argparse.Namespace) -> dict[str, Any]:
    import lowbit
    from lowbit.trainer import evaluate

    seed, method = int(rid["seed"]), rid["method"]
    torch.manual_seed(seed)
    calib = _calib(splits, args.calib_samples, seed)
    t0 = time.perf_counter()
    if method in ("ptq", "correct"):
        qm, extra = _ptq(model, calib, tuple(rid["bits"]), args, correct=method == "correct", seed=seed)
    elif method.startswith("adapt_"):
        w = method.removeprefix("adapt_")
        cfg = _adapt_config(tuple(rid["bits"]), args, window=None if w == "all" else int(w), seed=seed)
        qm = lowbit.quantize(model, "adapt", calib=calib, config=cfg)
        extra = {"layers": qm.lowbit_meta["adapt"]["layers"]}
    else:
        qm, extra = _lsq(model, calib, splits, tuple(rid["bits"]), args, seed, long=method == "lsq_long")
    took = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        size = lowbit.save(qm, Path(d) / "m.lowbit").stat().st_size
    return {"acc": evaluate(qm, splits.test), "time_s": took, "size_bytes": size, **extra}


def _adapt_config(bits: tuple[int, int], args: argparse.Namespace, **kw: Any) -> Any:
    from lowbit.methods.adapt import AdaptConfig

    return AdaptConfig(bits=bits, steps=args.steps, lr=args.lr, batch_size=args.adapt_batch_size,
                       first_last_bits=args.first_last_bits, calib_samples=args.calib_samples,
                       safeguard=not args.no_safeguard, patience=args.patience, check_every=args.check_every,
                       device=args.device, progress=not args.no_progress, **kw)


def _fake_quant(model: torch.nn.Module, calib: torch.Tensor, cfg: Any) -> tuple[Any, Any]:
    from lowbit.graph import prepare
    from lowbit.methods.adapt import Adapt

    prepared = prepare(model, calib[:1])
    return Adapt(cfg).fake_quant(prepared, [calib]), prepared.gm


def _ptq(model: torch.nn.Module, calib: torch.Tensor, bits: tuple[int, int], args: argparse.Namespace,
         correct: bool, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Plain PTQ with the best observer by output MSE on ``calib`` (``correct``: the ``mse`` observer, then
    the layer-wise correction)."""
    from lowbit.methods.adapt import AdaptConfig
    from lowbit.qat import convert
    from lowbit.qat.layerwise import CorrectionOptions, correct_layers
    from lowbit.qat.stages import calibrate_float, staging

    batches = [calib[i:i + 256] for i in range(0, len(calib), 256)]
    with torch.no_grad():
        target = model(calib)
    best: tuple[float, str, Any, Any] | None = None
    for obs in (["mse"] if correct else split_list(args.observers)):
        cfg = AdaptConfig(bits=bits, first_last_bits=args.first_last_bits, weight_observer=obs,
                          activation_observer=obs, steps=0, progress=False)
        qm, teacher = _fake_quant(model, calib, cfg)
        calibrate_float(qm, staging(qm), batches, *cfg.rules())
        with torch.no_grad():
            err = float(torch.nn.functional.mse_loss(qm.eval()(calib), target))
        if best is None or err < best[0]:
            best = (err, obs, qm, teacher)
    assert best is not None
    err, obs, qm, teacher = best
    extra: dict[str, Any] = {"observer": obs, "calib_mse": err}
    if correct:
        res = correct_layers(qm, teacher, calib, CorrectionOptions(steps=args.correct_steps, batch_size=args.batch_size,
                                                                   seed=seed, device=args.device,
                                                                   progress=not args.no_progress))
        qm.cpu()  # corrected on --device; the integer model runs on lowbit's CPU kernels
        extra["kept"] = sum(r.kept for r in res)
    return convert(qm), extra


def _lsq(model: torch.nn.Module, calib: torch.Tensor, splits: Any, bits: tuple[int, int], args: argparse.Namespace,
         seed: int, long: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """LSQ on the labelled training set: as many samples as ``adapt_all`` pushes through the network, or
    ``--qat-epochs`` with the accuracy curve (times without the evaluations)."""
    import lowbit
    from lowbit.methods.lsq import LSQConfig
    from lowbit.qat.layerwise import layer_order
    from lowbit.trainer import FitOptions, evaluate, fit

    cfg = LSQConfig(bits=bits, first_last_bits=args.first_last_bits, init=args.qat_init, lr=args.qat_lr,
                    batch_size=args.batch_size, seed=seed, threads=args.threads, progress=False,
                    device=args.device,
                    eval_every=args.eval_every if long else None)
    t0 = time.perf_counter()
    qm = lowbit.qat.prepare(model, cfg, calib=calib).to(args.device)
    prep_s = time.perf_counter() - t0
    n_layers = len(layer_order(qm))
    epochs = args.qat_epochs if long else (n_layers - 1) * args.steps * args.adapt_batch_size / len(splits.train)
    extra: dict[str, Any] = {"epochs": epochs}
    test = None
    if long:
        t1 = time.perf_counter()
        acc0 = evaluate(qm, splits.test, args.device)
        eval_s = time.perf_counter() - t1
        test = splits.test
    res = fit(qm, splits.train, test, FitOptions.from_config(cfg, epochs=epochs))
    if long:  # the training time at each point: the evaluations so far (each about eval_s) taken out; an
        # evaluation slower than eval_s (a busy machine) must not make the time run backwards
        curve, t = [(0.0, acc0, prep_s)], prep_s
        for k, r in enumerate(res.history):
            t = max(t, prep_s + r["time_s"] - (k + 1) * eval_s)
            curve.append((r["epoch"], r["test_acc"], t))
        extra["curve"] = curve
        extra["eval_s"] = eval_s
    t2 = time.perf_counter()
    im = lowbit.qat.convert(qm.cpu())  # trained on --device; the integer model runs on the CPU
    extra["train_s"] = prep_s + (extra["curve"][-1][2] if long else res.time_s) + time.perf_counter() - t2
    return im, extra


# ----------------------------------------------------------------------------------------- report

def _sel(records: list[dict[str, Any]], bits: tuple[int, int], method: str) -> list[dict[str, Any]]:
    return sorted((r for r in records if tuple(r["id"]["bits"]) == bits and r["id"]["method"] == method),
                  key=lambda r: r["id"]["seed"])


def _time_s(r: dict[str, Any]) -> float:
    return float(r.get("train_s", r["time_s"]))


def _time_to(curve: list[list[float]], acc: float, for_good: bool = False) -> float | None:
    """Training time at the first evaluation with accuracy >= ``acc`` (``for_good``: the first from which every
    later evaluation stays >= ``acc``); None if never."""
    hit = None
    for _epoch, a, t in curve:
        if a >= acc:
            if hit is None:
                hit = float(t)
            if not for_good:
                return hit
        elif for_good:
            hit = None
    return hit


def _report(records: list[dict[str, Any]], bits: list[tuple[int, int]], methods: list[str], float_acc: float,
            args: argparse.Namespace, out: Path) -> str:
    fl = "the same bits" if args.first_last_bits is None else f"{args.first_last_bits} bits"
    parts = [f"Float model: {args.model} on {args.data}, test accuracy **{float_acc:.2f}%**. First and last layer at "
             f"{fl}. {args.seeds} seed(s) per setting (the seed draws the {args.calib_samples} unlabelled calibration "
             f"images from the training set and orders every minibatch). adapt: at most {args.steps} Adam steps per "
             f"layer, lr {args.lr:g}, batch {args.adapt_batch_size}, safeguard {'off' if args.no_safeguard else 'on'}, "
             f"patience {args.patience} check(s) of {args.check_every} steps; correction: {args.correct_steps} steps "
             "per layer; PTQ chooses "
             f"among {args.observers} by calibration output MSE; LSQ: init {args.qat_init}, lr {args.qat_lr:g}, batch "
             f"{args.batch_size}, labelled training set. Accuracy: the integer model on lowbit's kernels, full test "
             "set, mean ± std over seeds. Time: wall time to make the integer model (no evaluation), one thread.", ""]
    for b in bits:
        w, a = b
        parts += [f"## W{w}A{a}", ""]
        rows = []
        for m in methods:
            rs = _sel(records, b, m)
            if not rs:
                continue
            note = ""
            if m == "ptq":
                note = "observer " + ", ".join(sorted({r["observer"] for r in rs}))
            elif m in ("lsq_equal", "lsq_long"):
                note = f"{rs[0]['epochs']:.2f} epochs"
            elif m == "correct":
                note = f"corrections kept in {min(r['kept'] for r in rs)}+ layers"
            elif m.startswith("adapt_"):
                note = _adapt_note(rs)
            rows.append([m, fmt_mean_std([r["acc"] for r in rs]), fmt_mean_std([_time_s(r) for r in rs], 1),
                         f"{rs[0]['size_bytes']:,}", len(rs), note])
        parts.append(markdown_table(["method", "int. accuracy %", "wall time s", "file bytes", "seeds", "notes"], rows))
        parts += ["", *_targets(records, b, methods, float_acc), ""]
        longs = _sel(records, b, "lsq_long")
        if longs:
            png = out.with_name(f"{out.stem}-w{w}a{a}-lsq.png")
            first = next((m for m in methods if m.startswith("adapt_")), "adapt_all")
            adapted = [r["acc"] for r in _sel(records, b, first)]
            plot_curves({"lsq (fake-quant)": [[(t, acc) for _e, acc, t in r["curve"]] for r in longs]}, png,
                        f"LSQ W{w}A{a}: accuracy vs training time (dashed: {first})",
                        mean_std(adapted)[0] if adapted else None, xlabel="training wall time (s, first seed's)")
            parts += [f"![LSQ W{w}A{a}]({png.name})", ""]
    return "\n".join(parts)


def _adapt_note(rs: list[dict[str, Any]]) -> str:
    """How many layer adaptations the safeguard reverted and how many steps ran, over the seeds."""
    rows = [row for r in rs for row in r["layers"] if row["trained"]]
    if not rows or "kept" not in rows[0]:
        return ""
    reverted = sum(not row["kept"] for row in rows)
    steps = sum(row["steps"] for row in rows) / len(rs)
    return f"reverted {reverted}/{len(rows)} layer adaptations; {steps:.0f} steps per run"


def _targets(records: list[dict[str, Any]], b: tuple[int, int], methods: list[str], float_acc: float) -> list[str]:
    """The issue's targets at this bit width: gap recovered and time against LSQ to the same accuracy (when the
    long LSQ run exists), never below PTQ (per seed)."""
    ptq = {r["id"]["seed"]: r["acc"] for r in _sel(records, b, "ptq")}
    longs = {r["id"]["seed"]: r for r in _sel(records, b, "lsq_long")}
    if not ptq:
        return []
    gap = float_acc - mean_std(ptq.values())[0]
    lines = [f"Float − PTQ gap: {gap:.2f} points."]
    for m in [m for m in methods if m.startswith("adapt_") or m == "correct"]:
        rs = _sel(records, b, m)
        if not rs:
            continue
        acc = mean_std([r["acc"] for r in rs])[0]
        rec = (f"recovers {100 * (acc - mean_std(ptq.values())[0]) / gap:.0f}% of the gap" if gap > 0
               else "no gap to recover (PTQ at float accuracy)")
        below = [r["id"]["seed"] for r in rs if r["acc"] < ptq.get(r["id"]["seed"], -1.0)]
        line = f"- {m}: {rec}; below PTQ in {len(below)}/{len(rs)} seeds"
        for good in (False, True):
            line += _reach(rs, longs, m, good)
        lines.append(line)
    return lines


def _reach(rs: list[dict[str, Any]], longs: dict[int, dict[str, Any]], m: str, for_good: bool) -> str:
    """How long LSQ (same seed) trains to reach each run's accuracy, and the run's time as a share of that."""
    reach = [(_time_s(r), _time_to(longs[r["id"]["seed"]]["curve"], r["acc"], for_good)) for r in rs
             if r["id"]["seed"] in longs]
    if not reach:
        return ""
    how = "reaches and keeps" if for_good else "first reaches"
    got = [(t, q) for t, q in reach if q is not None]
    if not got:
        return "; LSQ " + ("never stays at" if for_good else "never reaches") + " its accuracy within the long run"
    ratio = 100 * sum(t for t, _ in got) / sum(q for _, q in got)
    return (f"; LSQ {how} its accuracy (same seed) in {len(got)}/{len(reach)} seeds after "
            f"{fmt_mean_std([q for _, q in got], 1)} s of training: {m} takes {ratio:.0f}% of that")
