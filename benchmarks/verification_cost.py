"""What verification costs: `fxrebirth.optimize` wall time on torchvision models, split by phase.

Not collected by the plain test command. Run::

    python -m benchmarks.verification_cost [--models googlenet regnet_y_128gf] [--repeats 3]

For each model (random weights, BatchNorm statistics randomised, eval mode, batch 1 example at the size
given): the whole call, capture, the passes (with per-rewrite float64 verification, and that
verification's share), and the remainder (the whole-model check after the passes); best of ``repeats``.
``--no-verify`` times ``verify=False, check_output=False`` beside it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fxrebirth
from benchmarks._common import torchvision_model

MODELS = {"googlenet": 224, "regnet_y_128gf": 64}


def build(name: str) -> torch.nn.Module:
    return torchvision_model(name, seed=1)


def measure(name: str, size: int, repeats: int = 3, **options) -> dict[str, float]:
    model = build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    best: dict[str, float] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        _, report = fxrebirth.optimize(model, x, **options)
        total = time.perf_counter() - start
        row = {"model": name, "size": size, "total_s": total, "capture_s": report.capture_s,
               "passes_s": report.passes_s, "verify_s": report.verify_s,
               "rest_s": total - report.capture_s - report.passes_s, "rewrites": report.rewrites}
        if not best or row["total_s"] < best["total_s"]:
            best = row
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--size", type=int, default=None, help="input size (default: per model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-verify", action="store_true", help="also time verify=False, check_output=False")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.models:
        size = args.size or MODELS.get(name, 224)
        print(json.dumps(measure(name, size, args.repeats)))
        if args.no_verify:
            print(json.dumps({"verify": False, **measure(name, size, args.repeats, verify=False, check_output=False)}))
