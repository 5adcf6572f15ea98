"""``lowbit qat``: quantization-aware training of a model with lowbit's trainer, then the integer model,
measured and scored beside other methods as ``lowbit compare`` does.

::

    lowbit qat small_cnn --data mnist --method lsq --bits 4,4 --epochs 1 --init mse --seed 0
    torchrun --nproc_per_node 2 -m lowbit qat small_cnn --data mnist ...   # distributed (gloo on CPU)

The training checkpoint is written atomically at every evaluation; ``--resume`` continues from it (a
checkpoint of another model, method or configuration is refused). Only rank 0 evaluates, converts,
measures and writes files.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch

from lowbit.cliargs import add_threads, positive_float, positive_int, training_device

__all__ = ["add_commands", "cmd_qat"]


def _first_last(text: str) -> int | None:
    if text.strip().lower() in ("none", "same", "off"):
        return None
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 2 <= v <= 8:
        raise argparse.ArgumentTypeError(f"expected 2..8 or 'none', got {text!r}")
    return v


def add_commands(sub: argparse._SubParsersAction) -> None:
    from lowbit.cli import _add_data_args
    from lowbit.cliargs import lambdas
    from lowbit.quantizers import INITIALIZERS

    sp = sub.add_parser("qat", help="quantization-aware training (lsq, lsq_plus, apot), then measure like compare")
    sp.add_argument("model", help="built-in model name (its float checkpoint is trained first if missing), "
                                  "a torch.export archive (.pt2), or package.module:function")
    sp.add_argument("--checkpoint", default=None,
                    help="float checkpoint of a built-in model (default runs/MODEL-DATA.pt)")
    sp.add_argument("--weights-file", default=None, help="state_dict for a package.module:function model")
    sp.add_argument("--float-epochs", type=positive_int, default=None,
                    help="epochs to train the float model if its checkpoint does not exist")
    _add_data_args(sp)
    sp.add_argument("--method", default="lsq", help="training-aware method: lsq, lsq_plus, apot (default lsq)")
    sp.add_argument("--bits", default="4,4", metavar="W,A", help="weight and activation bits (default 4,4)")
    sp.add_argument("--init", default=None, choices=sorted(INITIALIZERS),
                    help="step initializer of weights and activations (default: the method's own)")
    sp.add_argument("--first-last-bits", type=_first_last, default=8, metavar="B|none",
                    help="bits of the first and last layers (default 8; none: the same as --bits)")
    sp.add_argument("--epochs", type=float, default=1.0, help="training epochs, fractions allowed (default 1)")
    sp.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the method's)")
    sp.add_argument("--batch-size", type=positive_int, default=None, help="training batch size (default 64)")
    sp.add_argument("--eval-every", type=positive_float, default=None, metavar="EPOCHS",
                    help="evaluate every this many epochs (default: each epoch)")
    sp.add_argument("--device", type=training_device, default="cpu",
                    help="training device: cpu, cuda or cuda:N where that GPU exists (default cpu)")
    sp.add_argument("--train-threads", type=positive_int, default=None, help="intra-op threads for training")
    sp.add_argument("--run-checkpoint", default=None,
                    help="training checkpoint, written atomically at every evaluation "
                         "(default runs/qat-MODEL-DATA-METHOD-wWaA-sSEED.pt)")
    sp.add_argument("--resume", action="store_true", help="continue from --run-checkpoint")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar (evaluations are still printed)")
    sp.add_argument("--option", action="append", metavar="KEY=VALUE", help="other method option (see docs)")
    sp.add_argument("--compare-with", default="static", metavar="METHODS",
                    help="methods measured beside the trained model and the float one (default static; "
                         "'none': only those two)")
    sp.add_argument("--lambdas", type=lambdas, default="1,1,1", metavar="λS,λT,λA",
                    help="weights of size, time, accuracy in the score L (default 1,1,1)")
    sp.add_argument("--repeats", type=positive_int, default=20, help="timed repeats per model (default 20)")
    add_threads(sp, what="for the latency measurements")
    sp.add_argument("--report-dir", default="report", help="where results and plots go (default report/)")
    sp.add_argument("--out", default="report/qat.lowbit", help="file for the trained integer model")
    sp.set_defaults(fn=cmd_qat)


def _config(args: argparse.Namespace) -> Any:
    from lowbit.methods import get_method
    from lowbit.methods.options import split_scoped
    from lowbit.methods.qat import QATMethod

    cls = get_method(args.method)
    if not issubclass(cls, QATMethod):
        raise ValueError(f"--method {args.method!r} is not training-aware; use `lowbit quantize` or `lowbit compare`")
    raw: dict[str, Any] = dict(split_scoped(args.option or [], [args.method]).get("*", {}))
    raw.update(bits=args.bits, epochs=str(args.epochs), seed=str(args.seed), device=args.device)
    for key in ("init", "lr", "batch_size", "eval_every"):
        if getattr(args, key) is not None:
            raw[key] = str(getattr(args, key))
    raw["first_last_bits"] = "none" if args.first_last_bits is None else str(args.first_last_bits)
    if args.train_threads is not None:
        raw["threads"] = str(args.train_threads)
    if args.no_progress:
        raw["progress"] = "false"
    cfg = cls.config_cls.from_dict(raw, method=args.method, strings=True)
    cls(cfg)  # bit widths outside the method's set fail here, before any work
    return cfg


def _run_checkpoint(args: argparse.Namespace, cfg: Any) -> Path:
    if args.run_checkpoint:
        return Path(args.run_checkpoint)
    w, a = cfg.bits
    name = Path(args.model).stem.replace(":", "_")
    return Path("runs") / f"qat-{name}-{args.data}-{args.method}-w{w}a{a}-s{args.seed}.pt"


def _model_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace the shared model helpers of lowbit.cli expect (their --epochs trains the float model)."""
    m = copy.copy(args)
    m.epochs = args.float_epochs
    return m


def cmd_qat(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit import files
    from lowbit.cli import _check_model_spec, _eval_fn, _inputs, _load_data
    from lowbit.compare import compare
    from lowbit.trainer import FitOptions, fit, init_distributed, rank

    cfg = _config(args)
    margs = _model_args(args)
    ckpt = _run_checkpoint(args, cfg)
    compare_with = [] if args.compare_with.strip().lower() == "none" else \
        [m.strip() for m in args.compare_with.split(",") if m.strip()]
    for m in compare_with:
        lowbit.methods.get_method(m)
    if args.resume and not ckpt.is_file():
        raise FileNotFoundError(f"--resume: no training checkpoint at {ckpt}")
    init_distributed(args.device)
    if rank() == 0:
        files.check_output(args.out, inputs=_inputs(margs))
        files.check_output(ckpt, inputs=_inputs(margs))
        files.check_output(args.report_dir, inputs=_inputs(margs), folder=True)
    _check_model_spec(margs)
    splits = _load_data(args)
    model = _float_model(margs, splits)
    torch.manual_seed(cfg.seed)
    qm = lowbit.qat.prepare(model, cfg, calib=splits.calib)
    meta = {"model": args.model, "dataset": splits.name, "method": args.method, "config": cfg.to_dict()}
    meta["config"].pop("progress", None)
    result = fit(qm, splits.train, splits.test, FitOptions.from_config(cfg, checkpoint=ckpt, resume=args.resume),
                 meta=meta)
    if rank() != 0:
        return 0
    qm.eval()
    im = lowbit.qat.convert(qm)
    agree, acc_fq, acc_int = _parity(qm, im, splits.test)
    epochs = result.steps / result.steps_per_epoch
    print(f"\n{args.method} W{cfg.bits[0]}A{cfg.bits[1]}: {result.steps} steps ({epochs:.2f} epochs) in "
          f"{result.time_s:.0f} s; fake-quant {acc_fq:.2f}%, integer {acc_int:.2f}%, same prediction on "
          f"{100 * agree:.2f}% of the test set")
    path = lowbit.save(im, args.out, inputs=_inputs(margs))
    print(f"integer model: {path} ({path.stat().st_size:,} bytes); training checkpoint: {ckpt}")
    res = compare(model, splits.calib, _eval_fn(splits), methods=compare_with, lambdas=args.lambdas,
                  repeats=args.repeats, threads=args.threads, report_dir=args.report_dir, models={args.method: im},
                  meta={"model": args.model, "dataset": splits.name, "qat_history": result.history,
                        "qat_parity": {"agreement": agree, "fake_quant_acc": acc_fq, "integer_acc": acc_int}})
    print()
    print(res.table())
    print(f"\nchosen: {res.chosen}")
    if res.report:
        print(f"report: {res.report.get('html', Path(args.report_dir) / 'index.html')}")
    return 0


def _float_model(margs: argparse.Namespace, splits: Any) -> torch.nn.Module:
    """The float model; under torchrun rank 0 resolves it first (it may train and cache it), then the others."""
    from lowbit.cli import _resolve_model
    from lowbit.trainer import rank, world_size

    if world_size() > 1 and rank() != 0:
        torch.distributed.barrier()
        return _resolve_model(margs, splits)
    model = _resolve_model(margs, splits)
    if world_size() > 1:
        torch.distributed.barrier()
    return model


@torch.no_grad()
def _parity(qm: torch.nn.Module, im: torch.nn.Module, test: Any) -> tuple[float, float, float]:
    """(share of test samples with the same prediction, fake-quant accuracy, integer accuracy)."""
    x, y = test.tensors
    same = correct_fq = correct_int = 0
    for i in range(0, len(y), 1000):
        a, b = qm(x[i:i + 1000]).argmax(1), im(x[i:i + 1000]).argmax(1)
        same += int((a == b).sum())
        correct_fq += int((a == y[i:i + 1000]).sum())
        correct_int += int((b == y[i:i + 1000]).sum())
    n = len(y)
    return same / n, 100.0 * correct_fq / n, 100.0 * correct_int / n

