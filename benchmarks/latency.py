"""Latency of eager vs torch.fx ``fuse`` vs fxrebirth's exact tier, and the pipeline's own cost.

Not collected by the plain test command. Run with pytest-benchmark::

    pytest benchmarks/latency.py benchmarks/pipeline_scaling.py --benchmark-group-by=param:model

or, for ratios measured side by side (variants interleaved round by round in one process, which is
what to quote on a noisy machine)::

    python -m benchmarks.latency [--rounds 30] [--models googlenet resnet50 mobilenet_v2] [--pipeline]
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from benchmarks._common import ABLATIONS, build, torchvision_model
from fxrebirth.measure.timing import interleaved_medians

MODELS = ["googlenet", "resnet50", "mobilenet_v2", "repvgg"]
VARIANTS = ["eager", "fx_fuse", "fxrebirth"]
LARGEST = "maxvit_t"  # the torchvision classification model with the most graph nodes (1,633 traced)


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
        model = torchvision_model(LARGEST)
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
        variants = VARIANTS + list(ABLATIONS.get(name, {}))
        runs = {v: _runner(*build(name, v)) for v in variants}
        med = interleaved_medians(runs, rounds)
        print(f"{name:<14}" + "".join(f"{med[v]:>11.2f} ms" for v in VARIANTS)
              + f"   {med['fx_fuse'] / med['eager']:>10.3f}  {med['fxrebirth'] / med['eager']:>15.3f}"
              + f"  {med['fxrebirth'] / med['fx_fuse']:>14.3f}")
        for ablation in ABLATIONS.get(name, {}):
            print(f"{'':<14}fxrebirth {ablation}: {med[ablation]:.2f} ms; fxrebirth / that = "
                  f"{med['fxrebirth'] / med[ablation]:.3f}")


def pipeline_cost(name: str = LARGEST, repeats: int = 3) -> None:
    """Capture, passes and verification time of the exact tier (best of ``repeats``)."""
    model = torchvision_model(name)
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
