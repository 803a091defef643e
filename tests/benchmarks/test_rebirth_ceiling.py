"""What retraining can buy: the Caffe-style GoogLeNet with its planned regions replaced by (untrained)
rebirth layers, against the original, eager and compiled, side by side.

Not collected by the plain test command. Run::

    python tests/benchmarks/test_rebirth_ceiling.py [--rounds 30] [--no-compile]

Prints the plan (each region's measured share of the model's time, its rebirth layer's estimated
cost) and then medians over shuffled interleaved rounds, batch 1, 224x224, fp32.
"""

from __future__ import annotations

import argparse
import time

import torch

import fxrebirth
from fxrebirth.models import googlenet_lrn
from fxrebirth.bench import interleaved_medians
from fxrebirth.rebirth import rebuild



def main(rounds: int, compile_too: bool) -> None:
    torch.manual_seed(0)
    model = googlenet_lrn().eval()
    x = torch.randn(1, 3, 224, 224)
    plan = fxrebirth.plan(model, x, repeats=10)
    print(plan.table())
    gm = fxrebirth.capture(model, x)
    everything = fxrebirth.Plan.from_json(plan.to_json())
    for r in everything.regions:
        r.selected = True
    variants = {"original": model, "planned": rebuild(gm, plan), "all_regions": rebuild(gm, everything)}
    if compile_too:
        for name in list(variants):
            torch._dynamo.reset()
            compiled = torch.compile(variants[name])
            with torch.no_grad():
                start = time.perf_counter()
                compiled(x)
            print(f"compiled {name} in {time.perf_counter() - start:.1f} s")
            variants[f"{name}_inductor"] = compiled
    with torch.no_grad():
        med = interleaved_medians({k: (lambda f=f: f(x)) for k, f in variants.items()}, rounds)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, median of {rounds} shuffled rounds")
    for key, value in med.items():
        base = med["original_inductor" if key.endswith("_inductor") else "original"]
        print(f"  {key:<24} {value:8.2f} ms   {base / value:5.2f}x faster than the original on the same runtime")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    main(args.rounds, not args.no_compile)
