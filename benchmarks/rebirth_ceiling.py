"""What retraining can buy: the Caffe-style GoogLeNet with its planned regions replaced by (untrained)
rebirth layers, against the original, eager and compiled, side by side.

Not collected by the plain test command. Run::

    python -m benchmarks.rebirth_ceiling [--rounds 30] [--no-compile]
    python -m benchmarks.rebirth_ceiling --thinner [--rounds 20]

``--thinner``: what a bigger speed-up than merging with widths kept would take (the paper's 3.87x):
every region replaced, with the inception reduce layers at the default half width, a quarter and an
eighth; eager, side by side.

Prints the plan (each region's measured share of the model's time, its rebirth layer's estimated
cost) and then medians over shuffled interleaved rounds, batch 1, 224x224, fp32.
"""

from __future__ import annotations

import argparse
import time

import torch

import fxrebirth
from fxrebirth.paper.models import googlenet_lrn
from fxrebirth.measure.timing import interleaved_medians
from fxrebirth.retraining.planning import rebuild



def main(rounds: int, compile_too: bool) -> None:
    torch.manual_seed(0)
    model = googlenet_lrn().eval()
    x = torch.randn(1, 3, 224, 224)
    plan = fxrebirth.plan(model, x, strategies=("streamline", "branch"), rounds=10)
    print(plan.table())
    gm = fxrebirth.capture(model, x)
    everything = fxrebirth.Plan.from_json(plan.to_json())
    for r in everything.candidates:
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


def thinner(rounds: int) -> None:
    torch.manual_seed(0)
    model = googlenet_lrn().eval()
    x = torch.randn(1, 3, 224, 224)
    gm = fxrebirth.capture(model, x)
    options = {"reduce 1/2 (default)": {}, "reduce 1/4": {"reduce_ratio": 0.25},
               "reduce 1/8": {"reduce_ratio": 0.125}}
    variants = {"original": model}
    for name, kwargs in options.items():
        plan = fxrebirth.plan(model, x, strategies=("streamline", "branch"), rounds=3, **kwargs)
        for r in plan.candidates:
            r.selected = True
        variants[name] = rebuild(gm, plan).eval()
        params = sum(p.numel() for p in variants[name].parameters())
        print(f"{name}: planned {plan.estimated_speedup:.2f}x, {params / 1e6:.2f} M parameters")
    with torch.inference_mode():
        med = interleaved_medians({k: (lambda f=f: f(x)) for k, f in variants.items()}, rounds)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, eager, batch 1, median of {rounds} rounds")
    for key, value in med.items():
        print(f"  {key:<24} {value:8.2f} ms   {med['original'] / value:5.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--thinner", action="store_true", help="reduce-layer widths: what 3.87x would take")
    args = parser.parse_args()
    if args.thinner:
        thinner(args.rounds)
    else:
        main(args.rounds, not args.no_compile)
