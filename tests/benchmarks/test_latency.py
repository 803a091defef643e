"""Latency of eager vs torch.fx ``fuse`` vs fxrebirth's exact tier, and the pipeline's own cost.

Not collected by the plain test command. Run with pytest-benchmark::

    pytest --benchmarks tests/benchmarks --benchmark-group-by=param:model

or, for ratios measured side by side (variants interleaved round by round in one process, which is
what to quote on a noisy machine)::

    python tests/benchmarks/test_latency.py [--rounds 30] [--models googlenet resnet50 mobilenet_v2] [--pipeline]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from typing import Callable

import torch
import torchvision
from torch.fx.experimental.optimization import fuse

import fxrebirth
from fxrebirth.testing import randomize_batchnorm

MODELS = ["googlenet", "resnet50", "mobilenet_v2"]
VARIANTS = ["eager", "fx_fuse", "fxrebirth"]
LARGEST = "maxvit_t"  # the torchvision classification model with the most graph nodes (1,633 traced)


def build(model_name: str, variant: str, size: int = 224) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model in one of the compared forms, and a batch-1 input."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    kwargs = {"init_weights": False} if model_name == "googlenet" else {}
    model = torchvision.models.get_model(model_name, weights=None, **kwargs)
    model = randomize_batchnorm(model).eval()
    x = torch.randn(1, 3, size, size)
    if variant == "fx_fuse":
        model = fuse(model)
    elif variant == "fxrebirth":
        model, _ = fxrebirth.optimize(model, x)
    return model, x


def _runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


try:
    import pytest

    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("model", MODELS)
    def test_latency(benchmark, model, variant):
        net, x = build(model, variant)
        run = _runner(net, x)
        for _ in range(3):
            run()
        benchmark.pedantic(run, rounds=20, iterations=1)

    def test_pipeline_time_largest_torchvision_model(benchmark):
        """Capture + passes + verification on the torchvision model with the most graph nodes."""
        model = randomize_batchnorm(torchvision.models.get_model(LARGEST, weights=None)).eval()
        x = torch.randn(1, 3, 224, 224)
        benchmark.pedantic(lambda: fxrebirth.optimize(model, x), rounds=3, iterations=1)
except ImportError:  # pragma: no cover - running as a script without pytest
    pass


def interleaved(models: list[str], rounds: int) -> None:
    """Median latency per variant, variants run in a shuffled order every round, and ratios."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, 224x224, fp32, "
          f"median of {rounds} shuffled interleaved rounds")
    print(f"{'model':<14}" + "".join(f"{v:>14}" for v in VARIANTS) + "   fuse/eager  fxrebirth/eager  fxrebirth/fuse")
    for name in models:
        runs = {v: _runner(*build(name, v)) for v in VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for run in runs.values():
            for _ in range(3):
                run()
        order = list(runs)
        shuffle = random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)  # no variant always runs right after another (measured: position alone moved one by 15%)
            for variant in order:
                start = time.perf_counter()
                runs[variant]()
                times[variant].append(time.perf_counter() - start)
        med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        print(f"{name:<14}" + "".join(f"{med[v]:>11.2f} ms" for v in VARIANTS)
              + f"   {med['fx_fuse'] / med['eager']:>10.3f}  {med['fxrebirth'] / med['eager']:>15.3f}"
              + f"  {med['fxrebirth'] / med['fx_fuse']:>14.3f}")


def pipeline_cost(name: str = LARGEST, repeats: int = 3) -> None:
    """Capture, passes and verification time of the exact tier (best of ``repeats``)."""
    model = randomize_batchnorm(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(1, 3, 224, 224)
    reports = [fxrebirth.optimize(model, x)[1] for _ in range(repeats)]
    best = min(reports, key=lambda r: r.capture_s + r.passes_s)
    unverified = min(
        (fxrebirth.optimize(model, x, verify=False)[1] for _ in range(repeats)), key=lambda r: r.passes_s
    )
    print(f"{name}: {best.nodes_before} nodes, {best.rewrites} rewrites; capture {best.capture_s:.2f} s, "
          f"passes {best.passes_s:.2f} s of which verification {best.verify_s:.2f} s; "
          f"passes without verification {unverified.passes_s:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--pipeline", action="store_true", help="also time the pipeline on " + LARGEST)
    args = parser.parse_args()
    interleaved(args.models, args.rounds)
    if args.pipeline:
        pipeline_cost()
