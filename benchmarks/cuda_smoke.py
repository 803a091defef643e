"""One-GPU smoke run of the retraining engine's CUDA paths (for a session or machine that has a GPU).

Not collected by the plain test command. Run::

    python -m benchmarks.cuda_smoke            # about a minute on one GPU
    torchrun --nproc-per-node=2 -m benchmarks.cuda_smoke --ddp   # two GPUs, NCCL

On a small width-scaled GoogLeNet (random weights, the embedded Shapes data at 32x32), it retrains every
region on ``cuda`` in fp32, bf16 and fp16 and on the CPU in fp32, from the same seeds, and checks that each
CUDA run returns a float32 CPU model whose logits are finite and close to the CPU run's, that its scratch
control trains, and that a checkpoint written on the GPU resumes on the CPU with the same weights. Prints one
line per check and exits non-zero on the first failure; without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import fxrebirth
from fxrebirth.paper.data import Shapes
from fxrebirth.paper.models import googlenet_lrn, he_init
from fxrebirth.retraining.engine import rebirth

SETTINGS = {"epochs": 0.5, "calibration_images": 256, "batch_size": 64, "eval_images": 256, "init": "auto"}


def _check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        sys.exit(1)


def main(ddp: bool) -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to smoke-test here")
        sys.exit(2)
    if ddp:
        torch.distributed.init_process_group("nccl")
    torch.manual_seed(0)
    model = he_init(googlenet_lrn(len(Shapes.classes), width=0.25)).eval()
    train, test = Shapes("train", 2048, 32), Shapes("test", 512, 32)
    plan = fxrebirth.plan(model, torch.randn(1, 3, 32, 32), repeats=1)
    for r in plan.candidates:
        r.selected = True
    x = torch.stack([test[i][0] for i in range(8)])
    cpu, _ = rebirth(model, plan, train, test_data=test, **SETTINGS)
    reference = cpu(x)
    for precision in ("fp32", "bf16", "fp16"):
        with tempfile.TemporaryDirectory() as folder:
            gpu, report = rebirth(model, plan, train, test_data=test, device="cuda", precision=precision,
                                  checkpoint_dir=folder, control=precision == "fp32", **SETTINGS)
            on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in gpu.parameters())
            out = gpu(x)
            error = float((out - reference).abs().max() / reference.abs().max())
            _check(f"cuda {precision}", on_cpu and bool(torch.isfinite(out).all()) and error < 0.25,
                   f"float32 CPU model {on_cpu}, relative max difference to the CPU run {error:.3g}, "
                   f"top-1 {report.student['top1']:.2%}")
            if precision == "fp32":
                _check("control on cuda", report.control is not None and report.control["trained_images"] > 0,
                       f"top-1 {report.control['top1']:.2%}")
                again, resumed = rebirth(model, plan, train, test_data=test, device="cpu", checkpoint_dir=folder,
                                         **SETTINGS)
                same = all(torch.equal(a, b) for a, b in zip(gpu.state_dict().values(), again.state_dict().values()))
                _check("resume on the cpu", resumed.resumed_from is not None and same, f"same weights {same}")
    if ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ddp", action="store_true", help="under torchrun: data-parallel over NCCL")
    main(parser.parse_args().ddp)
