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
import json
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


def _both_baselines(times: dict[str, list[float]]) -> list[float]:
    """Per round, the mean time of the two identical Inductor-with-freezing compiles (the first alone
    without the A/A row)."""
    baseline = times["inductor_freezing"]
    return [(a + b) / 2 for a, b in zip(baseline, times.get("inductor_freezing_again", baseline))]


def _print_ratios(times: dict[str, list[float]]) -> None:
    """Per-round time ratios of every compiled row to Inductor with freezing; with the A/A control, also to
    the mean of the two identical baselines in each round (two compiles of one model were measured up to 5%
    apart at batch 1, for the whole process; the mean is unbiased, where the faster of the two is not)."""
    baseline, both = times["inductor_freezing"], _both_baselines(times)
    for key in (k for k in times if k.startswith(("inductor_freezing_", "fxrebirth_"))):
        ratio, q1, q3 = ratio_spread(times[key], baseline)
        line = f"  {key} / Inductor with freezing, per round: {ratio:.3f} [IQR {q1:.3f}, {q3:.3f}]"
        if "inductor_freezing_again" in times and key.startswith("fxrebirth_"):
            ratio, q1, q3 = ratio_spread(times[key], both)
            line += f"; / both baselines: {ratio:.3f} [IQR {q1:.3f}, {q3:.3f}]"
        print(line)


def _save(path: str, name: str, batch: int, times: dict[str, list[float]]) -> None:
    """Adds the per-round milliseconds of ``name`` at ``batch`` to the JSON file ``path``."""
    results = json.loads(open(path).read()) if os.path.exists(path) else {}
    results[f"{name}@{batch}"] = times
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


TABLE_ROWS = ("inductor_freezing_again", "fxrebirth_backend", "fxrebirth_guard_none", "fxrebirth_freezing_config",
              "fxrebirth_freezing_config_identity")


def table(path: str) -> str:
    """The markdown table of docs/results.md from a ``--json-out`` file: per model and batch size, Inductor
    with freezing in ms and each row's median per-round time ratio to the mean of the two baselines, with
    its interquartile range (the A/A row against the first baseline alone)."""
    results = json.loads(open(path).read())
    lines = ["| model @ batch | Inductor + freezing, ms | " + " | ".join(TABLE_ROWS) + " |",
             "|---|---|" + "---|" * len(TABLE_ROWS)]
    for key, times in results.items():
        base, both = times["inductor_freezing"], _both_baselines(times)
        cells = []
        for row in TABLE_ROWS:
            ratio, q1, q3 = ratio_spread(times[row], base if row == "inductor_freezing_again" else both)
            cells.append(f"{ratio:.3f} [{q1:.3f}, {q3:.3f}]")
        lines.append(f"| {key} | {statistics.median(base):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(name: str, rounds: int, compile_only: bool = False, batch: int = 1,
            rows: list[str] | None = None, json_out: str | None = None) -> None:
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
    _print_ratios(times)
    if json_out:
        _save(json_out, name, batch, times)
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
    parser.add_argument("--json-out", default=None, help="add every row's per-round milliseconds to this file")
    parser.add_argument("--table", default=None, metavar="JSON", help="print the docs table of a --json-out file")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        raise SystemExit(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 224x224, fp32")
    for model_name in args.models:
        compare(model_name, args.rounds, args.compile_only, args.batch, args.rows, args.json_out)
