"""Run by tests/test_trainer.py under ``torchrun --nproc_per_node 2``: quantization-aware training of a small
CNN on digits with lowbit's trainer under DistributedDataParallel (gloo, CPU); every rank then writes its
parameters and buffers to OUT/rank{R}.pt for the test to compare."""

import sys
from pathlib import Path

import torch

import lowbit
from lowbit.data import load_dataset
from lowbit.models import build
from lowbit.trainer import FitOptions, fit, init_distributed, rank, world_size

torch.set_num_threads(1)
out = Path(sys.argv[1])
assert init_distributed("cpu") and world_size() == 2
splits = load_dataset("digits", seed=0)
torch.manual_seed(0)
model = build("small_cnn", 1, 10, 8).eval()
x = splits.calib.tensors[0]
calib = x[rank() * 48:(rank() + 1) * 48]  # each rank sees other calibration data: rank 0's init must win
qm = lowbit.qat.prepare(model, "lsq_plus", calib=calib, bits=(3, 3), init="mse")
init = {k: v.clone() for k, v in qm.state_dict().items()}
res = fit(qm, splits.train, splits.test, FitOptions(epochs=0.25, batch_size=32, lr=1e-4, progress=False, seed=1))
state = {"init": init, "final": qm.state_dict(), "history": res.history, "steps": res.steps}
torch.save(state, out / f"rank{rank()}.pt")
torch.distributed.destroy_process_group()
