"""How far float32 takes the zoo from its exact output, before and after optimisation: the data behind
the rounding criterion of the whole-model check (:mod:`fxrebirth.equivalence`: ``NOISE_FACTOR`` and the
float32 row of ``TOLERANCES``; :mod:`fxrebirth.rewrite.precision`).

Not collected by pytest. Run::

    python -m benchmarks.float32_noise [--models resnet18 timm:repvgg_a0] [--draws 8] [--again] [--cost]

For each model (random weights, randomised BatchNorm statistics as tests/test_torchvision.py does, eval
mode, a batch-1 example at 64x64 unless listed in ``SIZES``): :func:`fxrebirth.optimize` once, then
``--draws`` random inputs at batch 2 (the whole-model check's first input, other seeds), each run by
the original in float64 (the reference) and by the original and the optimised model in float32. Per
model it prints the spread of ``err32(original)`` and ``err32(optimised)`` (norm-wise relative errors
against the reference) over the draws, the worst ratio, and the criterion's margin: the smallest, over
the draws, of ``limit / err32(optimised)`` with ``limit = max(1e-5, NOISE_FACTOR * err32(original))`` (above 1:
accepted at that draw; optimize() judges its first check input, and 8 samples before refusing), and
optimize()'s own verdict (``-`` for entries measured before the criterion existed). Raw errors are cached per model in
``docs/data/float32_noise.json`` (``--again`` measures again), so an interrupted run resumes.
``--cost`` also times :func:`fxrebirth.optimize` on resnet50 (224x224) with the criterion and without
it (best of 3, the two interleaved).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

import fxrebirth
from benchmarks._common import ROOT, torchvision_model, write_atomically
from fxrebirth.equivalence import NOISE_FACTOR, relative_error, tolerance
from fxrebirth.graph.variants import variant_inputs

CACHE = ROOT / "docs" / "data" / "float32_noise.json"
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
          "densenet121", "googlenet", "shufflenet_v2_x1_0", "timm:repvgg_a0", "timm:mobileone_s0",
          "timm:resnet50d", "timm:efficientnet_b0", "timm:convnext_atto")
SIZES: dict[str, int] = {}


def build(name: str) -> torch.nn.Module:
    """The model ``name`` (``timm:`` prefix for timm), random weights (seeded), randomised BatchNorm-like
    statistics."""
    torch.manual_seed(0)
    if not name.startswith("timm:"):
        return torchvision_model(name, seed=1)
    import timm

    from tests.support.zoo import randomize_all_batchnorms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name[5:], pretrained=False)
    randomize_all_batchnorms(model, torch.Generator().manual_seed(1))
    return model.eval()


def measure(name: str, draws: int) -> dict[str, object]:
    """Raw figures of one model: per draw, the original's and the optimised model's float32 errors."""
    model = build(name)
    size = SIZES.get(name, 64)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    gm, report = fxrebirth.optimize(model, x)
    seconds = time.perf_counter() - start
    model64 = copy.deepcopy(model).double()
    rows = []
    with torch.no_grad():
        for seed in range(draws):
            (inputs,) = variant_inputs((x,), 0, seed)
            exact = model64(inputs.double())
            rows.append([relative_error(exact, model(inputs)), relative_error(exact, gm(inputs))])
    rounding = [c for c in report.checks if c.startswith("rounding:")]
    return {"size": size, "rewrites": report.rewrites, "optimize_s": seconds, "draws": rows,
            "output_error": report.output_error, "output_error64": report.output_error64,
            "rounding": rounding[0] if rounding else None}


def summary(name: str, entry: dict) -> str:
    """One printed row: spreads, worst ratio and the criterion's margin at its constants."""
    rows = entry["draws"]
    own = [r[0] for r in rows]
    mine = [r[1] for r in rows]
    ratio = max(m / o if o else float("inf") for o, m in rows)
    margin = min(max(tolerance(torch.float32), NOISE_FACTOR * o) / m if m else float("inf") for o, m in rows)
    verdict = entry.get("rounding") or ""
    verdict = "accepted" if "within the limit" in verdict else ("REFUSED" if verdict else "-")
    return (f"{name:<24} {entry['size']:>4} {entry['rewrites']:>4}  {min(own):.1e}-{max(own):.1e}  "
            f"{min(mine):.1e}-{max(mine):.1e}  {ratio:6.2f}  {margin:7.1f}  {verdict}")


def cost(repeats: int = 3) -> None:
    """optimize() on resnet50 at 224x224 (batch-1 example), and what the rounding criterion adds to it:
    :func:`~fxrebirth.rewrite.precision.float32_check` timed on its own after the float64 check it follows
    (best of ``repeats`` each)."""
    from fxrebirth.rewrite.endtoend import compare
    from fxrebirth.rewrite.precision import float32_check

    model = torchvision_model("resnet50", seed=1)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    totals, checks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        gm, _ = fxrebirth.optimize(model, x)
        totals.append(time.perf_counter() - start)
        outcome = compare(model, gm, (x,))
        start = time.perf_counter()
        float32_check(model, gm, outcome)
        checks.append(time.perf_counter() - start)
    print(f"resnet50 224x224: optimize() {min(totals):.2f} s, of which the rounding criterion {min(checks):.2f} s "
          f"({100 * min(checks) / min(totals):.1f}%), best of {repeats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--again", action="store_true", help="measure again, ignoring the cache")
    parser.add_argument("--cost", action="store_true", help="also time optimize() on resnet50")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    print(f"{'model':<24} {'size':>4} {'rw':>4}  {'err32(original)':<15}  {'err32(optimised)':<16}  "
          f"{'ratio':>6}  {'margin':>7}  optimize()")
    for name in args.models:
        if args.again or name not in cache or len(cache[name]["draws"]) < args.draws:
            cache[name] = measure(name, args.draws)
            write_atomically(CACHE, cache)
        print(summary(name, cache[name]), flush=True)
    if args.cost:
        cost()


if __name__ == "__main__":
    main()
