"""The retraining ablation: initialisation x training schedule, each with accuracy and retraining cost.

Not collected by the plain test command. Run::

    python -m benchmarks.rebirth_ablation [--epochs 2.5] [--out ablation.json]

Uses the cached default teacher (trained on first use) and one plan (every region selected). Each
variant gets the same retraining budget in epochs: ``distill`` spends it on end-to-end distillation,
``paper`` splits it evenly over its one-region steps (the paper spent about 2 epochs per step over 9+
steps) and trains on labels with the new layer at 10x the learning rate, as the paper did; one more row
spends a tenth of the budget on layer-wise distillation before end-to-end distillation. Prints one row per variant: held-out top-1 with its 95% interval, the paired interval of the
difference to the teacher, epochs, calibration images and wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fxrebirth
from fxrebirth.paper.data import Shapes
from fxrebirth.retraining.engine import INITS, RebirthConfig, rebirth
from fxrebirth.paper.teacher import TeacherConfig, default_teacher


def main(epochs: float, out: str | None, inits: list[str], schedules: list[str]) -> None:
    config = TeacherConfig()
    teacher, meta = default_teacher(config)
    plan = fxrebirth.plan(teacher, torch.randn(1, 3, 224, 224), repeats=3)
    for r in plan.candidates:
        r.selected = True
    train = Shapes("train", config.train_images, config.image_size, seed=config.seed)
    test = Shapes("test", config.test_images, config.image_size, seed=config.seed)
    print(f"teacher top-1 {meta['top1']:.2%} on {meta['test_images']} held-out images; {len(plan.selected)} "
          f"regions merged; budget {epochs} epochs of {len(train)} images")
    print(f"{'init':<9} {'schedule':<18} {'top-1':>7} {'95% interval':>17} {'vs teacher (paired)':>26} "
          f"{'epochs':>7} {'calib':>6} {'wall s':>7}")
    rows = []
    paper = {"lr": 2e-4, "new_layer_lr_mult": 10.0}  # the paper's 10x for the new layer
    variants = [(init, "distill", {}) for init in inits if "distill" in schedules]
    if "distill" in schedules and "lstsq" in inits:
        variants.append(("lstsq", "distill", {"layerwise_epochs": 0.25 * epochs / 2.5, "epochs": epochs * 0.9}))
    variants += [(init, "paper", paper) for init in ("xavier", "lstsq") if init in inits and "paper" in schedules]
    for init, schedule, extra in variants:
        options = {"epochs": epochs / len(plan.selected) if schedule == "paper" else epochs, **extra}
        cfg = RebirthConfig(init=init, schedule=schedule, **options)
        began = time.perf_counter()
        _, report = rebirth(teacher, plan, train, test_data=test, config=cfg)
        wall = time.perf_counter() - began
        s, (lo, hi) = report.student, report.difference_interval
        diff = s["top1"] - report.teacher["top1"]
        name = schedule + ("+layerwise" if cfg.layerwise_epochs else "")
        print(f"{init:<9} {name:<18} {s['top1']:>7.2%} [{s['top1_interval'][0]:.2%}, {s['top1_interval'][1]:.2%}]"
              f" {diff:>+8.2%} [{lo:+.2%}, {hi:+.2%}] {report.retraining_epochs:>7.2f} "
              f"{report.calibration_images:>6} {wall:>7.0f}", flush=True)
        rows.append({"init": init, "schedule": name, "report": report.to_dict(), "wall_s": wall})
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=2.5)
    parser.add_argument("--out")
    parser.add_argument("--init", action="append", choices=INITS)
    parser.add_argument("--schedule", action="append", choices=("distill", "paper"))
    args = parser.parse_args()
    main(args.epochs, args.out, args.init or list(INITS), args.schedule or ["distill", "paper"])
