"""The speed table for the Caffe-style GoogLeNet: the original under every runtime people use, against
fxrebirth's exact tier and the reborn model, side by side in one process.

Not collected by the plain test command. Run::

    python tests/benchmarks/test_speed_table.py [--rounds 20] [--batch 1 8]

Variants (224x224, fp32, this CPU): the original under eager, ``torch.fx.experimental.optimization.fuse``,
Inductor with freezing and ONNX Runtime (all graph optimisations, TorchScript exporter: the faster of the
two on every model measured, docs/results.md); fxrebirth's exact tier (eager); the reborn model (every
planned region replaced) under eager, ``torch.compile(backend="fxrebirth")`` and ONNX Runtime. The reborn
model's rebirth layers are freshly initialised: latency does not depend on the weights' values, and this
keeps the table independent of a training run. Medians over shuffled interleaved rounds; ratios against
the original under the same runtime and against the original under ONNX Runtime.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, os.path.dirname(__file__))
from test_runtimes import _compiled, _freezing, _onnx  # noqa: E402

import fxrebirth  # noqa: E402
from fxrebirth.bench import interleaved_medians  # noqa: E402
from fxrebirth.capture import capture  # noqa: E402
from fxrebirth.cost import graph_flops  # noqa: E402
from fxrebirth.models import googlenet_lrn  # noqa: E402
from fxrebirth.rebirth import rebuild  # noqa: E402


def _eager(model: torch.nn.Module, x: torch.Tensor):
    def run() -> object:
        with torch.inference_mode():
            return model(x)
    return run


def table(batch: int, rounds: int) -> None:
    torch.manual_seed(0)
    model = googlenet_lrn(1000).eval()
    x = torch.randn(batch, 3, 224, 224)
    plan = fxrebirth.plan(model, x[:1], repeats=3)
    original = capture(model, (x,))
    reborn = rebuild(original, plan).eval()
    exact, _ = fxrebirth.optimize(model, x)
    runs = {
        "original eager": _eager(model, x),
        "original fx fuse": _eager(fuse(model), x),
        "original inductor+freezing": _freezing(model, x)[0],
        "original onnxruntime": _onnx(model, x, dynamo=False)[0],
        "exact tier eager": _eager(exact, x),
        "reborn eager": _eager(reborn, x),
        "reborn compile(fxrebirth)": _compiled(reborn, x, backend="fxrebirth")[0],
        "reborn onnxruntime": _onnx(reborn, x, dynamo=False)[0],
    }
    med = interleaved_medians(runs, rounds)
    flops = {"original": graph_flops(original), "reborn": graph_flops(capture(reborn, (x,)))}
    print(f"\nbatch {batch}, 224x224, fp32, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"ONNX Runtime intra-op threads = torch's, median of {rounds} shuffled rounds; "
          f"GFLOPs original {flops['original'] / 1e9:.2f}, reborn {flops['reborn'] / 1e9:.2f}")
    print(f"  {'variant':<28} {'ms':>8} {'vs original, same runtime':>27} {'vs original under ORT':>22}")
    same = {"eager": "original eager", "fuse": "original eager", "inductor": "original inductor+freezing",
            "compile": "original inductor+freezing", "onnxruntime": "original onnxruntime"}
    for name, ms in med.items():
        runtime = next((v for k, v in same.items() if k in name), "original eager")
        print(f"  {name:<28} {ms:>8.2f} {med[runtime] / ms:>26.2f}x {med['original onnxruntime'] / ms:>21.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    for b in args.batch:
        table(b, args.rounds)
