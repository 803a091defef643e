"""Do depth plans for different runtimes choose differently? The profile bundle, timed per runtime.

Not collected by the plain test command. Run::

    python -m benchmarks.depth_plan_runtimes [--models mobilenet_v2 resnet18] [--rounds 20]

For each torchvision model (random weights, randomised BatchNorm: the latencies do not depend on the
weights' values; the importances are those of this untrained network, the same for every runtime):

1. ``fxrebirth.retraining.profiling.profile(model, x224, depth=True)`` writes the bundle once;
2. its own timing script times it under ONNX Runtime and OpenVINO f32 (in this process: the same code
   the device runs), each table cached in ``benchmarks/cache/depth_plan_runtimes/``;
3. ``fxrebirth.plan(strategies="depth")`` plans with eager timings taken here and with each table, calibration on 64 random
   images at 64x64, and selects the model's target (as far as each runtime's front reaches).

Printed per model and runtime (JSON lines): candidates faster merged, the front's reach, the estimated
speed-up of the selection, the selected candidates, and their overlap with eager's selection.

4. Each selection is then built (``merge(linearise(...))`` with the exact tier after it, as the depth job
   deploys) and the original and the three reborn models are timed under all three runtimes, the twelve
   runs in ``--rounds`` shuffled interleaved rounds in one process: the measured speed-up of each plan on
   each runtime beside the estimate its own planner made.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks._common import ROOT, torchvision_model, write_atomically
from fxrebirth.frontends.library import optimize
from fxrebirth.graph.capture import capture
from fxrebirth.measure.devicetimer import time_bundle
from fxrebirth.measure.speed import runtime_runner
from fxrebirth.measure.timing import interleaved_medians
from fxrebirth.passes.linearise import linearise, merge
import fxrebirth
from fxrebirth.retraining.profiling import profile

CACHE = ROOT / "benchmarks" / "cache" / "depth_plan_runtimes"
TARGETS = {"mobilenet_v2": 1.5, "resnet18": 1.3}


def _table(bundle: Path, runtime: str, rounds: int) -> Path:
    path = CACHE / f"{bundle.name}-{runtime}.json"
    if not path.exists():
        write_atomically(path, time_bundle(str(bundle), runtime, rounds=rounds, threads=torch.get_num_threads()))
    return path


RUNTIMES = ("eager", "onnxruntime", "openvino")


def verify(name: str, model: torch.nn.Module, x: torch.Tensor, plans: dict, rounds: int, folder: Path) -> dict:
    """Median ms of the original and of each runtime's reborn model, under every runtime, interleaved."""
    models = {"original": optimize(model, x)[0]}
    for runtime, plan in plans.items():
        gm = capture(model, (x,))
        models[f"plan for {runtime}"] = optimize(merge(linearise(gm, plan.validate(gm))), x)[0]
    runs = {}
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for variant, m in models.items():
            for runtime in RUNTIMES:
                tag = variant.replace(" ", "-")
                runs[f"{variant} | {runtime}"] = runtime_runner(m, runtime, x, str(folder), name=f"{name}-{tag}")
        return interleaved_medians(runs, rounds)


def measure(name: str, rounds: int) -> list[dict]:
    model = torchvision_model(name, seed=1)
    x, calibration = torch.randn(1, 3, 224, 224), torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    bundle = CACHE / name
    if not (bundle / "manifest.json").exists():
        start = time.perf_counter()
        profile(model, x, str(bundle), depth=True)
        print(json.dumps({"model": name, "profiled_s": round(time.perf_counter() - start, 1)}))
    rows, chosen, plans = [], {}, {}
    for runtime in RUNTIMES:
        start = time.perf_counter()
        table = None if runtime == "eager" else str(_table(bundle, runtime, rounds))
        plan = fxrebirth.plan(model, (x,), strategies="depth", calibration=calibration, rounds=rounds,
                              device_table=table)
        reach = max(p.speedup for p in plan.front)
        target = min(TARGETS[name], reach * 0.999)
        plan.select(target_speedup=target)
        chosen[runtime] = {c.region.id for c in plan.selected}
        plans[runtime] = plan
        eager = chosen.get("eager", set())
        rows.append({"model": name, "runtime": runtime, "candidates": len(plan.candidates),
                     "faster_merged": sum(c.gain_s > 0 for c in plan.candidates), "front_reach": round(reach, 3),
                     "target": round(target, 3), "estimated_speedup": round(plan.estimated_speedup, 3),
                     "selected": len(chosen[runtime]), "shared_with_eager": len(chosen[runtime] & eager),
                     "summed_kl": float(f"{sum(c.importance for c in plan.selected):.3g}"),
                     "latency_ms": round(plan.latency_s * 1e3, 2), "plan_s": round(time.perf_counter() - start, 1),
                     "selection": sorted(chosen[runtime])})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "selection"}))
    ms = verify(name, model, x, plans, rounds, CACHE / f"{name}-verify")
    for row in rows:
        row["measured_ms"] = {rt: round(ms[f"plan for {row['runtime']} | {rt}"], 3) for rt in RUNTIMES}
        row["measured_speedup"] = {rt: round(ms[f"original | {rt}"] / ms[f"plan for {row['runtime']} | {rt}"], 3)
                                   for rt in RUNTIMES}
        print(json.dumps({k: row[k] for k in ("model", "runtime", "estimated_speedup", "measured_speedup")}))
    rows.append({"model": name, "runtime": "original", "measured_ms": {rt: round(ms[f"original | {rt}"], 3)
                                                                        for rt in RUNTIMES}})
    print(json.dumps(rows[-1]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(TARGETS))
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [row for name in args.models for row in measure(name, args.rounds)]
    write_atomically(CACHE / "results.json", results)
