"""fxrebirth where models are compiled and deployed: torch.compile and ONNX Runtime, side by side.

Not collected by the plain test command. Run::

    python -m benchmarks.runtimes [--rounds 30] [--models googlenet resnet50 mobilenet_v2]

For each model (random weights, randomised BatchNorm, batch 1, 224x224, fp32): eager; torch.compile
with Inductor, without and with freezing; torch.compile(backend="fxrebirth") (Inductor inside); ONNX
Runtime (all graph optimisations, as many intra-op threads as torch) on the original model exported by
each exporter (TorchScript-based ``dynamo=False`` and ``dynamo=True``) and on the fxrebirth-optimised
model with the faster exporter. Latencies are medians over shuffled interleaved rounds; compile/export
times are the first call's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import torch

from benchmarks._common import build  # noqa: E402 - the same models as the exact-tier latency benchmark
from fxrebirth.measure.timing import interleaved_medians, interleaved_times, ratio_spread  # noqa: E402

import fxrebirth  # noqa: E402
from fxrebirth.measure.speed import compiled_runner, export_onnx, ort_runner  # noqa: E402


def _timed(build: Callable[[], Callable[[], object]]) -> tuple[Callable[[], object], float]:
    """A runner and the seconds its construction took (the library's runners make their first call:
    compilation, or export and session creation)."""
    start = time.perf_counter()
    run = build()
    return run, time.perf_counter() - start


def _onnx_runner(model: torch.nn.Module, x: torch.Tensor, dynamo: bool) -> Callable[[], object]:
    """ONNX Runtime on ``model`` exported by the TorchScript-based or the dynamo exporter, called once."""
    path = export_onnx(model, x, os.path.join(tempfile.mkdtemp(), "model.onnx"), "dynamo" if dynamo else "torchscript")
    run = ort_runner(path, x)
    run()
    return run


def _builders(model: torch.nn.Module, x: torch.Tensor, eager: Callable[[], object],
              compile_only: bool) -> dict[str, Callable[[], Callable[[], object]]]:
    """How to build each row's runner (each built and called once when the row is measured)."""
    builders: dict[str, Callable[[], Callable[[], object]]] = {
        "eager": lambda: eager,
        "inductor": lambda: compiled_runner(model, x),
        "inductor_freezing": lambda: compiled_runner(model, x, freezing=True),
        # the A/A control: a second, identical compile, so that the noise floor of a ratio (placement of
        # the weights, the order of compiles) is measured beside the ratios it bounds
        "inductor_freezing_again": lambda: compiled_runner(model, x, freezing=True),
        "fxrebirth_backend": lambda: compiled_runner(model, x, backend="fxrebirth"),
        "fxrebirth_guard_none": lambda: compiled_runner(model, x, backend="fxrebirth", options={"guard": "none"}),
        # under the Inductor setting that the baseline needs, Dynamo hands the backend the weights as
        # attributes guarded by identity, not as hundreds of guarded graph inputs
        "fxrebirth_freezing_config": lambda: compiled_runner(model, x, freezing=True, backend="fxrebirth"),
        "fxrebirth_freezing_config_identity": lambda: compiled_runner(
            model, x, freezing=True, backend="fxrebirth", options={"guard": "identity"}),
        "fxrebirth_no_freezing": lambda: compiled_runner(
            model, x, backend="fxrebirth", options={"freezing": False}),
    }
    if not compile_only:
        builders["ort_torchscript"] = lambda: _onnx_runner(model, x, dynamo=False)
        builders["ort_dynamo"] = lambda: _onnx_runner(model, x, dynamo=True)
    return builders


def compare(name: str, rounds: int, compile_only: bool = False, batch: int = 1,
            rows: list[str] | None = None) -> None:
    """Every row (or only ``rows``, beside eager and Inductor with freezing) for ``name``, timed side by side."""
    model, x = build(name, "eager")
    x = torch.randn(batch, *x.shape[1:])
    gm, report = fxrebirth.optimize(model, x)
    runs: dict[str, Callable[[], object]] = {}
    setup: dict[str, float] = {}

    def eager() -> object:
        with torch.no_grad():
            return model(x)

    builders = _builders(model, x, eager, compile_only)
    for key, make in builders.items():
        if rows is None or key in rows or key in ("eager", "inductor_freezing") or key.startswith("ort_"):
            runs[key], setup[key] = _timed(make)
    times = interleaved_times(runs, rounds)
    med = {key: statistics.median(values) for key, values in times.items()}
    print(f"\n{name} (fxrebirth: {report.rewrites} rewrites)")
    for key in med:
        print(f"  {key:<20} {med[key]:8.2f} ms  ({med[key] / med['eager']:.3f}x eager)  setup {setup[key]:6.1f} s")
    for key in (k for k in runs if k.startswith(("inductor_freezing_", "fxrebirth_"))):
        ratio, q1, q3 = ratio_spread(times[key], times["inductor_freezing"])
        print(f"  {key} / Inductor with freezing, per round: {ratio:.3f} [IQR {q1:.3f}, {q3:.3f}]")
    if compile_only:
        return
    best = "ort_torchscript" if med["ort_torchscript"] <= med["ort_dynamo"] else "ort_dynamo"
    runs["ort_fxrebirth"], setup["ort_fxrebirth"] = _timed(lambda: _onnx_runner(gm, x, dynamo=best == "ort_dynamo"))
    # a second pass: the optimised ONNX model against the baseline exporter, interleaved
    pair_med = interleaved_medians({"ort_original": runs[best], "ort_fxrebirth": runs["ort_fxrebirth"]}, rounds)
    print(f"  faster exporter for the original: {best}")
    print(f"  ONNX Runtime, interleaved: original {pair_med['ort_original']:.2f} ms, fxrebirth-optimised "
          f"{pair_med['ort_fxrebirth']:.2f} ms (ratio {pair_med['ort_fxrebirth'] / pair_med['ort_original']:.3f}); "
          f"export of the optimised model {setup['ort_fxrebirth']:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=["googlenet", "resnet50", "mobilenet_v2"])
    parser.add_argument("--compile-only", action="store_true", help="torch.compile variants only (no ONNX)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only these torch.compile rows, beside eager and Inductor with freezing")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 224x224, fp32")
    for model_name in args.models:
        compare(model_name, args.rounds, args.compile_only, args.batch, args.rows)
