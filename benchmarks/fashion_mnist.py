"""The real-data benchmark: user-style teachers on Fashion-MNIST through ``fxrebirth run --max-drop`` as a user
runs it, and the table of docs/real-data.md.

Not collected by the plain test command. Run::

    python -m benchmarks.fashion_mnist [--arch resnet18 mobilenet_v2] [--runtime onnxruntime openvino]
                                       [--max-drop 0.5 2] [--budget 0.25] [--write-docs]

1. The data and the teachers come from :mod:`benchmarks.fashion_mnist_teachers` (plain torch, trained once,
   resumable per epoch; ``apt-get install dataset-fashion-mnist``).
2. Each job is the command line a user types, run in a subprocess: the teacher's architecture by name with its
   state_dict, the ImageFolder tree (``train/`` and ``val/``: the validation split is a seeded hold-out of
   ``train/``, the 10,000 test images are evaluated once at the end), the teacher's own preprocessing (32x32,
   its mean and standard deviation, grey images replicated to three channels by the tool), its training cost
   (epochs), the runtime to plan for and the accuracy budget. The deployed resolution is the training one,
   32x32. Each job resumes from its report folder (``benchmarks/cache/fashion-mnist/jobs/<teacher>-<runtime>-
   budget<b>/``), which the drops of one teacher and runtime share: the second drop's search reads back the plan
   and every set of merges the first trained (each drop's report is kept as ``report-drop<d>.*``).
3. The table: per job, the test-split top-1 of teacher and reborn with the paired interval, the speed-up on the
   job's runtime at batch 1 (the speed table's median of interleaved rounds), the points tried and the
   retraining images of all of them as a share of the teacher's, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import ROOT
from benchmarks.fashion_mnist_teachers import CACHE, MEAN, SIZE, STD, train_teacher, write_folder

DOC = ROOT / "docs" / "real-data.md"
JOBS = CACHE / "jobs"


def job_name(arch: str, runtime: str, budget: float) -> str:
    """A teacher's report folder on one runtime and budget, shared by its drops: the plan and every trained set
    of merges (``points/``) are read back by the next drop's search instead of measured and trained again."""
    return f"{arch}-{runtime.replace(' ', '_')}-budget{budget:g}"


def command(record: dict, root: Path, runtime: str, max_drop: float, budget: float, out: Path,
            control: bool) -> list[str]:
    """The user's command line for one job."""
    return [sys.executable, "-m", "fxrebirth", "-q", "run", record["arch"], "--weights", record["weights"],
            "--data", str(root), "--image-size", str(SIZE), "--plan-size", str(SIZE), "--mean", str(MEAN),
            "--std", str(STD), "--teacher-epochs", str(record["epochs"]), "--runtime", runtime,
            "--max-drop", f"{max_drop:g}", "--budget", f"{budget:g}", "--bench", "fast", "--bench-batch", "1",
            "--no-memory", "--out", str(out), *([] if control else ["--no-control"])]


def run_job(record: dict, root: Path, runtime: str, max_drop: float, budget: float, control: bool) -> dict:
    """One job (resumed when its folder holds a finished or interrupted run); its summary row."""
    out = JOBS / job_name(record["arch"], runtime, budget)
    summary_path = out / f"summary-drop{max_drop:g}.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    argv = command(record, root, runtime, max_drop, budget, out, control)
    print(" ".join(argv[1:]), flush=True)
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr, flush=True)
        return {"arch": record["arch"], "runtime": runtime, "max_drop": max_drop, "budget": budget,
                "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    for name in ("report.json", "report.md", "reborn.pt2"):  # the next drop writes its own into the folder
        stem, suffix = name.split(".")
        (out / name).replace(out / f"{stem}-drop{max_drop:g}.{suffix}")
    summary = summarise(json.loads((out / f"report-drop{max_drop:g}.json").read_text()), record, runtime, max_drop,
                        budget)
    summary["wall_s"] = time.time() - began
    summary["timed"] = timed(record, out / f"reborn-drop{max_drop:g}.pt2", runtime)
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def timed(record: dict, reborn: Path, runtime: str, rounds: int = 30) -> dict:
    """The original and the reborn model (``reborn``, a torch.export file) under ``runtime`` at batch 1, 32x32,
    timed side by side in ``rounds`` shuffled interleaved rounds in this process: medians and the per-round
    ratio's quartiles."""
    import tempfile

    import torch

    from fxrebirth.measure.runtimes import get_runtime
    from fxrebirth.measure.speed import runtime_runner
    from fxrebirth.measure.timing import interleaved_times, ratio_spread
    from fxrebirth.paper.loading import load_trained

    x = torch.randn(1, 3, SIZE, SIZE)
    models = {"original": load_trained(record["arch"], record["weights"]),
              "reborn": _plain(torch.export.load(reborn).module())}
    with tempfile.TemporaryDirectory(prefix="fmnist-timing-") as folder, torch.no_grad():
        runs = {}
        for name, model in models.items():
            lowered, _ = get_runtime(runtime).lower(model, x)
            runs[name] = runtime_runner(lowered, runtime, x, folder, name=name)
        times = interleaved_times(runs, rounds)
    ratio, q1, q3 = ratio_spread(times["original"], times["reborn"])
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"original_ms": median["original"], "reborn_ms": median["reborn"], "speedup": ratio,
            "speedup_iqr": [q1, q3], "rounds": rounds, "threads": torch.get_num_threads()}


def _plain(module):
    """A loaded torch.export program's module as a plain GraphModule (the loaded one refuses ``train()``, which
    the ONNX exporter calls)."""
    import torch.fx

    return torch.fx.GraphModule(module, module.graph).eval()


def summarise(report: dict, record: dict, runtime: str, max_drop: float, budget: float) -> dict:
    """The table's row of a finished job's report.json."""
    rebirth, search = report["rebirth"], report["search"]
    rows = {(r["variant"], r["runtime"]): r for r in report["speed"]["rows"]}
    ms = {v: rows[(v, runtime)]["ms"].get("1") or rows[(v, runtime)]["ms"].get(1) for v in ("original", "reborn")}
    return {"arch": record["arch"], "runtime": runtime, "max_drop": max_drop, "budget": budget,
            "teacher_test_top1": rebirth["teacher"]["top1"], "reborn_test_top1": rebirth["student"]["top1"],
            "interval": rebirth["difference_interval"], "teacher_val_top1": report["teacher"]["val_top1"],
            "table_speedup": ms["original"] / ms["reborn"], "estimated_speedup": report["planned_speedup"],
            "merges": len([c for c in report["plan"]["candidates"] if c["selected"]]),
            "points": [{k: t[k] for k in ("index", "estimated_speedup", "val_top1", "drop", "trained_images",
                                          "forward_images", "wall_s")} for t in search["trials"]],
            "chosen": search["chosen"], "front_points": len(search["points"]),
            "trained_images": search["trained_images"], "forward_images": search["forward_images"],
            "teacher_images": search["teacher_images"], "share": search["teacher_share"],
            "chosen_images": search["per_point_images"], "cpu": report["environment"]["cpu"],
            "search_wall_s": sum(t["wall_s"] for t in search["trials"]),
            "control_top1": (rebirth.get("control") or {}).get("top1")}


def _percent(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "not trained"


def markdown(rows: list[dict], records: dict[str, dict]) -> str:
    """docs/real-data.md."""
    lines = ["# Real data: user-style teachers on Fashion-MNIST", "",
             "Generated by `python -m benchmarks.fashion_mnist --write-docs` (resumable; hours on 2 cores). Each "
             "teacher is a torchvision architecture trained from scratch by a plain torch script "
             "(`benchmarks/fashion_mnist_teachers.py`, no fxrebirth code) on the 60,000 training images of "
             "Fashion-MNIST (Debian's `dataset-fashion-mnist`, written as an ImageFolder tree), at 32x32. Each job "
             "is the command a user types:", "",
             "```", "fxrebirth run resnet18 --weights resnet18.pt --data fashion-mnist/ --image-size 32 --plan-size 32 "
             f"--mean {MEAN} --std {STD} --teacher-epochs 12 --runtime onnxruntime --max-drop 0.5", "```", "",
             "Decisions use a seeded 10% hold-out of `train/` (validation); the 10,000 test images of `val/` are "
             "evaluated once, at the end. Speed: batch 1 at the deployed resolution (32x32), the original and the "
             "reborn model on the job's runtime, the median of 30 shuffled interleaved rounds in one process (in "
             "brackets the per-round ratio's quartiles), timed again after the job, one job at a time. Retraining: "
             "images passed forward and backward in every point the search tried, against the teacher's; the drops of "
             "one teacher and runtime share their report folder, so a later drop reads back the sets of merges an "
             "earlier one trained (their images are counted in each drop's row, but trained once).", "",
             "| teacher | test top-1 | runtime | max drop | reborn test top-1 (paired 95%) | speed-up on the runtime "
             "(ms) | scratch control | points tried | retraining images (share of teacher's) | forward only | "
             "retraining wall, all points |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | | {r['runtime']} | {r['max_drop']:g} | failed: {r['error']} | | | | | | |")
            continue
        lo, hi = r["interval"]
        t = r["timed"]
        lines.append(f"| {r['arch']} | {r['teacher_test_top1']:.2%} | {r['runtime']} | {r['max_drop']:g} | "
                     f"{r['reborn_test_top1']:.2%} ({100 * (r['reborn_test_top1'] - r['teacher_test_top1']):+.2f} pt "
                     f"[{100 * lo:+.2f}, {100 * hi:+.2f}]) | **{t['speedup']:.2f}x** [{t['speedup_iqr'][0]:.2f}, "
                     f"{t['speedup_iqr'][1]:.2f}] ({t['original_ms']:.3f} -> {t['reborn_ms']:.3f}) | "
                     f"{_percent(r.get('control_top1'))} | {len(r['points'])} of {r['front_points']} | "
                     f"{r['trained_images']} ({r['share']:.1%}) | {r['forward_images']} | "
                     f"{r['search_wall_s'] / 60:.0f} min |")
    lines += ["", "Every point each search tried (validation split; estimated speed-up from the plan):", ""]
    for r in rows:
        if "error" in r:
            continue
        tried = ", ".join(f"{p['estimated_speedup']:.2f}x: {-p['drop']:+.2f} pt ({p['trained_images']} images)"
                          + (" chosen" if p["index"] == r["chosen"] else "") for p in r["points"])
        lines.append(f"- {r['arch']}, {r['runtime']}, drop {r['max_drop']:g}: {tried}")
    lines += ["", "Teachers:", ""]
    lines += [f"- {a}: {rec['epochs']} epochs ({rec['images']} images), test top-1 {rec['test_top1']:.2%}, "
              f"{rec['wall_s'] / 60:.0f} min" for a, rec in records.items()]
    cpus = sorted({r["cpu"] for r in rows if "cpu" in r})
    threads = sorted({r["timed"].get("threads", 1) for r in rows if "timed" in r})
    lines += ["", f"Measured on: {', '.join(cpus)}, {'/'.join(map(str, threads))} thread(s) "
              "(`OMP_NUM_THREADS`, as the jobs ran)."]
    return "\n".join(lines) + "\n"


def _teacher(arch: str, epochs: int, root: Path) -> dict:
    """The teacher's record: the one trained already (whatever its epochs), else trained now for ``epochs``."""
    record = CACHE / f"{arch}.json"
    return json.loads(record.read_text()) if record.exists() else train_teacher(arch, epochs, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--runtime", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--max-drop", nargs="+", type=float, default=[0.5])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=12, help="the teachers' epochs")
    parser.add_argument("--control", action="store_true", help="also train each chosen point's scratch control")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--retime", action="store_true", help="time every finished job's models again (alone)")
    parser.add_argument("--finished", action="store_true", help="only the jobs that have finished (no training)")
    args = parser.parse_args()
    root = write_folder()
    records = {arch: _teacher(arch, args.epochs, root) for arch in args.arch}
    rows = []
    for arch in args.arch:
        for runtime in args.runtime:
            for drop in args.max_drop:
                done = JOBS / job_name(arch, runtime, args.budget) / f"summary-drop{drop:g}.json"
                if args.finished and not done.exists():
                    continue
                rows.append(run_job(records[arch], root, runtime, drop, args.budget, args.control))
                if args.retime and "error" not in rows[-1]:
                    out = JOBS / job_name(arch, runtime, args.budget)
                    rows[-1]["timed"] = timed(records[arch], out / f"reborn-drop{drop:g}.pt2", runtime)
                    (out / f"summary-drop{drop:g}.json").write_text(json.dumps(rows[-1], indent=1))
                print(json.dumps(rows[-1]), flush=True)
    text = markdown(rows, records)
    if args.write_docs:
        DOC.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
