"""The accuracy-vs-budget curve on the default teacher: the reborn model against its scratch control.

Not collected by the plain test command. Run::

    python -m benchmarks.budget_curve [--budgets 5000 20000 80000] [--teacher-epochs 4] [--init original]
                                      [--cache .budget-cache]

Uses the cached default teacher (``--teacher-epochs``: trained on first use, about a minute an epoch) and one
plan at 224x224 with every region selected (saved in ``--cache``, shared by every teacher). For each budget (training images forward and backward, spent on end-to-end distillation),
:func:`benchmarks._budget.budget_curve` trains the reborn model and its scratch control (the same
architecture re-initialised, the same loss, learning rate and training-time BatchNorms, the same number of
images). Every budget checkpoints under ``--cache``, and the plan is saved there too, so an interrupted run
resumes with the same regions. Prints the Markdown table (the rows for docs/results.md).
"""

from __future__ import annotations

import argparse
import os

import torch

import fxrebirth
from fxrebirth.paper.data import Shapes
from fxrebirth.paper.teacher import TeacherConfig, default_teacher
from benchmarks._budget import budget_curve, budget_figure, budget_table


def cached_plan(teacher: torch.nn.Module, cache: str, *, keep: tuple[str, ...] = (), **planning) -> fxrebirth.Plan:
    """The plan at 224x224 with every region selected but those ``keep`` names (region ids, or prefixes such
    as ``"streamline:"``: :meth:`fxrebirth.Plan.keep`), saved in ``cache`` on first use and read back after
    (shared by every teacher, so that every run merges the same regions). ``planning``: options of
    :func:`fxrebirth.plan` that change the rebirth layers' geometry (``reduce_ratio``, ``streamline_kernel``);
    each set of them has a file of its own (the defaults keep ``plan.json``, the name older caches have)."""
    os.makedirs(cache, exist_ok=True)
    suffix = "".join(f"-{k}={planning[k]}" for k in sorted(planning))
    plan_path = os.path.join(cache, f"plan{suffix}.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            plan = fxrebirth.Plan.from_json(f.read())
    else:
        plan = fxrebirth.plan(teacher, torch.randn(1, 3, 224, 224), repeats=3, **planning)
        for r in plan.candidates:
            r.selected = True
        with open(plan_path, "w") as f:
            f.write(plan.to_json(indent=1))
    plan.keep(keep)
    return plan


def main(budgets: list[int], cache: str, teacher_epochs: int = 4, init: str = "original") -> str:
    config = TeacherConfig(epochs=teacher_epochs)
    teacher, meta = default_teacher(config)
    plan = cached_plan(teacher, cache)
    train = Shapes("train", config.train_images, config.image_size, seed=config.seed)
    test = Shapes("test", config.test_images, config.image_size, seed=config.seed)
    cost = {"images": meta["epochs"] * meta["train_images"], "wall_s": meta.get("wall_s")}
    folder = os.path.join(cache, f"t{teacher_epochs}-{init}")  # one folder of checkpoints per teacher and init
    points = budget_curve(teacher, plan, train, test, budgets, checkpoint_dir=folder, teacher_cost=cost, init=init)
    head = (f"Teacher: googlenet_lrn trained on {meta['train_images']:,} Shapes images for {meta['epochs']} epochs "
            f"({cost['images']:,} images forward and backward), {meta['top1']:.2%} top-1 on "
            f"{meta['test_images']:,} held-out images; {len(plan.selected)} regions merged, init {init}.\n\n")
    return head + budget_table(points) + "\n\n" + budget_figure(points)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[5000, 20000, 80000])
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--init", default="original", choices=("original", "auto", "lstsq", "xavier"))
    parser.add_argument("--cache", default=".budget-cache")
    args = parser.parse_args()
    print(main(args.budgets, args.cache, args.teacher_epochs, args.init))
