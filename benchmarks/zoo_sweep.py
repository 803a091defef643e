"""Sweep the model zoo (tests.support.zoo) through optimize, the torch.compile backend and torch.export.

    python -m benchmarks.zoo_sweep [--shard I/N] [--only NAME ...] [--limit K] [--timeout S] [--cache DIR]
    python -m benchmarks.zoo_sweep --table          # docs/zoo.md from the cache alone

The population (every attention-free torchvision and timm classification model of at most 50M
parameters) is surveyed once on the meta device and kept in ``DIR/population.json``. Each model is then
run in a worker process with a time limit, and its row written atomically to ``DIR/<source>__<name>.json``;
a model already in the cache is skipped, so an interrupted sweep resumes where it stopped. A worker that
hangs past ``--timeout`` is killed and the model recorded as a timeout; one that dies is recorded as a
crash. ``--shard I/N`` (I from 1 to N) takes every N-th model of the population, starting at the I-th.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, write_atomically  # noqa: E402

DOC = ROOT / "docs" / "zoo.md"
RECYCLE = 20  # models per worker process: bounds what a long-lived process accumulates
ENTRY_POINTS = ("optimize", "backend", "export")


def row_path(cache: Path, source: str, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return cache / f"{source}__{safe}.json"


def versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}


def load_population(cache: Path, again: bool = False) -> dict[str, Any]:
    """The survey of every candidate (cached in ``population.json`` per library versions)."""
    path = cache / "population.json"
    current = versions()
    if path.exists() and not again:
        data = json.loads(path.read_text())
        if data.get("versions") == current:
            return data
        print(f"{path}: made with {data.get('versions')}, now {current}: surveying again", file=sys.stderr)
    from dataclasses import asdict

    from tests.support import zoo

    print("surveying every torchvision and timm model on the meta device (a few minutes) ...", file=sys.stderr)
    start = time.perf_counter()
    candidates = zoo.survey()
    data = {"versions": current, "max_params": 50_000_000, "candidates": [asdict(c) for c in candidates]}
    members = zoo.population(max_params=data["max_params"], candidates=candidates)
    data["population"] = [[m.source, m.name] for m in members]
    write_atomically(path, data)
    print(f"surveyed {len(candidates)} models in {time.perf_counter() - start:.0f} s: {len(members)} in the "
          f"population; kept in {path}", file=sys.stderr)
    return data


def select_members(population: list[list[str]], shard: str | None, only: list[str] | None,
                   limit: int | None) -> list[tuple[str, str]]:
    members = [tuple(m) for m in population]
    if only:
        wanted = set(only)
        members = [m for m in members if m[1] in wanted or f"{m[0]}:{m[1]}" in wanted]
        missing = wanted - {m[1] for m in members} - {f"{m[0]}:{m[1]}" for m in members}
        if missing:
            print(f"not in the population: {', '.join(sorted(missing))}", file=sys.stderr)
    if shard:
        index, count = (int(v) for v in shard.split("/"))
        if not 1 <= index <= count:
            raise SystemExit(f"--shard {shard}: I must be between 1 and N")
        members = members[index - 1::count]
    return members[:limit] if limit is not None else members


class Worker:
    """A child process that sweeps one model per request (protocol: one JSON line each way)."""

    def __init__(self, log: Path, entry_points: list[str], statistics: str, threads: int | None) -> None:
        self.log = open(log, "a")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.zoo_sweep", "--worker", "--statistics", statistics, "--entry-points", *entry_points,
             *(["--threads", str(threads)] if threads else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
            start_new_session=True, cwd=ROOT,
        )
        self.served = 0

    def ask(self, source: str, name: str, timeout: float) -> dict[str, Any] | str:
        """The row, or "timeout" / "crashed (exit code N)"."""
        self.proc.stdin.write(json.dumps([source, name]) + "\n")
        self.proc.stdin.flush()
        self.served += 1
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return "timeout"
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return f"crashed (exit code {self.proc.returncode})"
        return json.loads(line)

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def worker_main(entry_points: list[str], statistics: str) -> int:
    """Read ``[source, name]`` lines, answer each with the row as one JSON line."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a model prints goes to the log, not into the protocol
    import torch

    from tests.support.zoo_sweep import sweep_one

    for line in sys.stdin:
        source, name = json.loads(line)
        print(f"--- {source}:{name}", file=sys.stderr, flush=True)
        try:
            row = sweep_one(source, name, entry_points=entry_points, statistics=statistics)
        except Exception as exc:  # noqa: BLE001 - sweep_one catches per entry point; this is a last resort
            row = {"source": source, "name": name, "built": False, "reason": f"harness: {type(exc).__name__}: {exc}"}
        torch._dynamo.reset()
        protocol.write(json.dumps(row) + "\n")
        protocol.flush()
    return 0


def sweep(args: argparse.Namespace) -> int:
    cache = Path(args.cache)
    data = load_population(cache, again=args.survey)
    members = select_members(data["population"], args.shard, args.only, args.limit)
    family = {(c["source"], c["name"]): c["family"] for c in data["candidates"]}
    todo = [m for m in members if args.force or _stale(row_path(cache, *m), args.statistics, args.again)]
    print(f"{len(members)} selected, {len(members) - len(todo)} already in {cache}, {len(todo)} to run",
          file=sys.stderr)
    worker: Worker | None = None
    counts: Counter[str] = Counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the worker is stopped too
    try:
        for i, (source, name) in enumerate(todo, 1):
            if worker is None or worker.served >= RECYCLE:
                if worker is not None:
                    worker.stop()
                worker = Worker(cache / "worker.log", args.entry_points, args.statistics, args.threads)
            start = time.perf_counter()
            answer = worker.ask(source, name, args.timeout)
            if isinstance(answer, str):
                worker.stop(kill=True)
                worker = None
                row = {"source": source, "name": name, "family": family.get((source, name), "?"),
                       "built": None, "failure": answer.split(" ")[0],
                       "reason": f"no result within {args.timeout:.0f} s" if answer == "timeout" else answer}
            else:
                row = answer
            row["sweep_seconds"] = round(time.perf_counter() - start, 1)
            write_atomically(row_path(cache, source, name), row)
            summary = summarise(row)
            counts[summary] += 1
            print(f"[{i}/{len(todo)}] {source}:{name}: {summary} ({row['sweep_seconds']} s)", file=sys.stderr,
                  flush=True)
    finally:
        if worker is not None:
            worker.stop(kill=True)
    print(", ".join(f"{n} {s}" for s, n in counts.most_common()) or "nothing to run", file=sys.stderr)
    return 0


def _stale(path: Path, statistics: str, again: bool = False) -> bool:
    """Whether the model must run (again): no row yet, one swept with other BatchNorm statistics, or
    (``again``) one where an entry point was not ok or float32 rounding (an error, a refusal, a mismatch)."""
    if not path.exists():
        return True
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return True
    settled = all(s in ("ok", "rounding") for s in summarise(row).split("/"))
    return row.get("statistics", "uniform") != statistics or (again and not settled)


def summarise(row: dict[str, Any]) -> str:
    if row.get("failure"):
        return row["failure"]
    if not row.get("built"):
        return "not built"
    if row.get("size") is None:
        return "no input size"
    statuses = [row[p]["status"] for p in ENTRY_POINTS if p in row]
    return "ok" if all(s == "ok" for s in statuses) else "/".join(statuses)


# ---------------------------------------------------------------------------------------------- table


def load_rows(cache: Path, population: list[list[str]]) -> list[dict[str, Any]]:
    rows = []
    for source, name in population:
        path = row_path(cache, source, name)
        if path.exists():
            rows.append(json.loads(path.read_text()))
    return rows


def fully_folded(row: dict[str, Any]) -> bool:
    entry = row.get("optimize", {})
    return entry.get("status") in ("ok", "rounding") and entry.get("foldable_left") == 0


def captured(row: dict[str, Any], point: str) -> bool:
    entry = row.get(point)
    return bool(entry) and entry["status"] in ("ok", "rounding", "mismatch", "unproven")


def equivalent(row: dict[str, Any], point: str) -> bool:
    entry = row.get(point)
    return bool(entry) and entry["status"] == "ok"


def table(cache: Path, doc: Path) -> str:
    data = json.loads((cache / "population.json").read_text())
    population = data["population"]
    candidates = data["candidates"]
    rows = load_rows(cache, population)
    by_source = Counter(s for s, _ in population)
    excluded_attention = sum(1 for c in candidates if c["attention"] is not None)
    excluded_size = sum(1 for c in candidates if c["attention"] is None and c["params"] is not None
                        and c["params"] > data["max_params"])
    unknown = sum(1 for c in candidates if c["error"])
    built = [r for r in rows if r.get("built")]
    sized = [r for r in built if r.get("size") is not None]

    kinds = Counter(r.get("batchnorm_statistics", "uniform") for r in sized)
    statistics = ", ".join(f"{k} in {n} models" for k, n in kinds.most_common()) or "none run"
    out = ["# The model zoo", ""]
    out += [
        "Every attention-free image-classification model of torchvision and timm with at most 50M parameters,",
        "built with random weights and random BatchNorm gamma, beta, running mean and variance",
        f"(`tests.support.zoo.build`; statistics: {statistics}), through the three entry points: `fxrebirth.optimize`,",
        "`torch.compile(backend=\"fxrebirth\")` (inner compiler `eager`) and `torch.export` + `optimize_exported`.",
        "Each is compared with the original model in float32 at batch 2 at the smallest square input size (64,",
        "96, ..., 320) the model runs at; *equivalent* means a norm-wise relative error <= 1e-5",
        "(`fxrebirth.equivalence.tolerance(torch.float32)`), *fully folded* that no BatchNorm is left that a",
        "neighbouring convolution or linear layer could absorb (`tests.support.zoo.foldable_batchnorms`).",
        "A result above 1e-5 in float32 is *float32 rounding* when the same entry point run on float64 copies",
        "of the model and input is within 1e-5 of the float64 original (the rewrites are exact) and, for",
        "optimize and export, the float32 result is the float64 run's program with its weights rounded to",
        "float32 (`fxrebirth.rewrite.endtoend.weight_rounding` within `fxrebirth.equivalence.WEIGHT_ROUNDING`",
        "units of roundoff): the rule `fxrebirth.optimize` itself applies. The backend's graphs are not",
        "compared; its float64 run proves its rewrites. Random weights make many deep models ill-conditioned,",
        "so the original's own float32 rounding (its float32 output against its float64 copy's, quoted in",
        "each reason) is often above 1e-5. Anything else is a *mismatch*.",
        "",
        "**Population** (`tests.support.zoo.population`): `torchvision.models.list_models(module=torchvision.models)`",
        "and `timm.list_models()`, surveyed on the meta device, less the models with an attention block (a",
        "`torch.nn.MultiheadAttention`, a module whose class name contains `Attention`, or a matrix product of two",
        "input-dependent tensors in the forward pass; squeeze-excite, ECA, CBAM, selective-kernel and",
        "split-attention gating are not attention, global-context blocks are) and those above 50M parameters.",
        "",
        "**Regenerate**: `python -m benchmarks.zoo_sweep` (resumable; `--shard I/N` splits it), then",
        "`python -m benchmarks.zoo_sweep --table`. Versions: "
        + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        "",
        "## Headline",
        "",
        "| | models |",
        "|---|---:|",
        f"| candidates surveyed | {len(candidates)} |",
        f"| excluded: attention | {excluded_attention} |",
        f"| excluded: more than 50M parameters | {excluded_size} |",
        f"| **population** | **{len(population)}** ({by_source['torchvision']} torchvision, {by_source['timm']} timm"
        + (f"; {unknown} not buildable on the meta device" if unknown else "") + ") |",
        f"| tried | {len(rows)} |",
        f"| built and run | {len(sized)} |",
    ]
    for point in ENTRY_POINTS:
        out.append(f"| captured by {point} | {sum(captured(r, point) for r in sized)} |")
    for point in ENTRY_POINTS:
        out.append(f"| equivalent through {point} | {sum(equivalent(r, point) for r in sized)} |")
    out.append(f"| equivalent through all three | {sum(all(equivalent(r, p) for p in ENTRY_POINTS) for r in sized)} |")
    out.append(f"| fully folded (optimize) | {sum(fully_folded(r) for r in sized)} |")
    mismatches = [(r, p) for r in sized for p in ENTRY_POINTS if r.get(p, {}).get("status") == "mismatch"]
    out.append(f"| **mismatches** (an optimised model above 1e-5) | **{len(mismatches)}** |")
    rounding = sum(1 for r in sized for p in ENTRY_POINTS if r.get(p, {}).get("status") == "rounding")
    out.append(f"| float32 rounding (exact in float64; weights rounded from the float64 run's) | {rounding} |")
    unproven = sum(1 for r in sized for p in ENTRY_POINTS if r.get(p, {}).get("status") == "unproven")
    out.append(f"| unproven (above 1e-5 in float32; the float64 run could not repeat the rewrites) | {unproven} |")
    noisy = sum(1 for r in sized if isinstance(r.get("noise32"), float) and r["noise32"] > 1e-5)
    out.append(f"| models whose own float32 rounding exceeds 1e-5 | {noisy} |")
    out.append("")

    out += ["## By family", "",
            "Equivalent: through optimize / backend / export. Convs and BNs: summed over the family's models that",
            "optimize returned (captured graph -> optimised graph).", "",
            "| family | population | tried | built | captured | equivalent | fully folded | convs | BNs |",
            "|---|---:|---:|---:|---:|---|---:|---|---|"]
    families: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    family_of = {(c["source"], c["name"]): c["family"] for c in candidates}
    members_per_family = Counter((s, family_of[(s, n)]) for s, n in population)
    for r in rows:
        families[(r["source"], r.get("family") or family_of.get((r["source"], r["name"]), "?"))].append(r)
    for key in sorted(members_per_family):
        group = families.get(key, [])
        ok = [r for r in group if r.get("optimize", {}).get("convs_after") is not None]
        convs = f"{sum(r['optimize']['convs_before'] for r in ok)} -> {sum(r['optimize']['convs_after'] for r in ok)}"
        bns = f"{sum(r['optimize']['bns_before'] for r in ok)} -> {sum(r['optimize']['bns_after'] for r in ok)}"
        good = [r for r in group if r.get("size") is not None]
        out.append(
            f"| {key[0]}/{key[1]} | {members_per_family[key]} | {len(group)} | {len(good)} "
            f"| {sum(captured(r, 'optimize') for r in good)} "
            f"| {' / '.join(str(sum(equivalent(r, p) for r in good)) for p in ENTRY_POINTS)} "
            f"| {sum(fully_folded(r) for r in good)} | {convs if ok else '-'} | {bns if ok else '-'} |")
    out.append("")

    out += ["## Re-parameterisable families", "",
            "timm models with train-time branches (byobnet repvgg/mobileone, fastvit, repvit, repghost, ghostnetv3):",
            "convolutions in the captured model, after optimize and after export, against",
            "`timm.utils.model.reparameterize_model` (timm's own deploy-time fusion); BNs left after optimize / export.", "",
            "| model | size | convs before | optimize | export | timm reparam | BNs left | status |",
            "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted((r for r in rows if r.get("reparameterisable")), key=lambda r: r["name"]):
        o, e = r.get("optimize", {}), r.get("export", {})
        timm_convs = o.get("convs_timm_reparam", "-")
        if isinstance(timm_convs, str) and timm_convs != "-":
            timm_convs = "failed"
        verdict = summarise(r)
        if isinstance(timm_convs, int) and isinstance(o.get("convs_after"), int) and o["convs_after"] > timm_convs:
            verdict += "; more convs than timm"
        out.append(f"| {r['name']} | {r.get('size', '-')} | {o.get('convs_before', '-')} | {o.get('convs_after', '-')} "
                   f"| {e.get('convs_after', '-')} | {timm_convs} | {o.get('bns_after', '-')} / {e.get('bns_after', '-')} "
                   f"| {verdict} |")
    out.append("")

    out += ["## Failures", "",
            "Every model or entry point that was not equivalent, mismatches first. A model is listed once per",
            "entry point that failed; \"not fully folded\" lists the models optimize left foldable BatchNorms in.", "",
            "| model | entry point | status | reason |", "|---|---|---|---|"]
    failures = []
    order = {"mismatch": 0, "unproven": 0, "error": 1, "not captured": 2, "timeout": 3, "crashed": 3, "not built": 4,
             "no input size": 4, "not fully folded": 5, "rounding": 6}
    for r in rows:
        model = f"{r['source']}:{r['name']}"
        if r.get("failure"):
            failures.append((order.get(r["failure"], 3), model, "-", r["failure"], r.get("reason", "")))
            continue
        if not r.get("built"):
            failures.append((4, model, "-", "not built", r.get("reason", "")))
            continue
        if r.get("size") is None:
            failures.append((4, model, "-", "no input size", r.get("reason", "")))
            continue
        for p in ENTRY_POINTS:
            entry = r.get(p)
            if entry and entry["status"] != "ok":
                failures.append((order.get(entry["status"], 1), model, p, entry["status"], entry.get("reason", "")))
        o = r.get("optimize", {})
        if o.get("status") in ("ok", "rounding") and o.get("foldable_left"):
            failures.append((5, model, "optimize", "not fully folded", f"{o['foldable_left']} foldable BatchNorm(s) left"))
    for _, model, point, status, reason in sorted(failures, key=lambda f: (f[0], f[1], f[2])):
        reason = reason.replace("|", "\\|").replace("\n", " ")
        out.append(f"| {model} | {point} | {status} | {reason} |")
    if not failures:
        out.append("| (none) | | | |")
    out.append("")
    text = "\n".join(out)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", metavar="I/N", help="every N-th model, starting at the I-th (1 <= I <= N)")
    parser.add_argument("--cache", default=str(ROOT / ".zoo-cache"), help="where rows are kept (default .zoo-cache/)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these models (name or source:name)")
    parser.add_argument("--limit", type=int, metavar="K", help="only the first K selected models")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="S", help="seconds per model (default 900)")
    parser.add_argument("--force", action="store_true", help="run selected models again even if cached")
    parser.add_argument("--again", action="store_true", help="run cached models again unless every entry point was ok or float32 rounding")
    parser.add_argument("--survey", action="store_true", help="survey the population again (population.json)")
    parser.add_argument("--entry-points", nargs="+", default=list(ENTRY_POINTS), choices=ENTRY_POINTS)
    parser.add_argument("--statistics", default="calibrated", choices=("uniform", "calibrated"),
                        help="BatchNorm running statistics (tests.support.zoo.build; default calibrated: "
                             "uniform ones make deep models ill-conditioned in float32); a cached row swept "
                             "with the other choice runs again")
    parser.add_argument("--threads", type=int, metavar="T", help="torch threads per worker (default torch's)")
    parser.add_argument("--table", action="store_true", help="only write docs/zoo.md from the cache")
    parser.add_argument("--doc", default=str(DOC), help="where --table writes (default docs/zoo.md)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return worker_main(args.entry_points, args.statistics)
    if args.table:
        path = Path(args.cache) / "population.json"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run the sweep first")
        table(Path(args.cache), Path(args.doc))
        print(f"wrote {args.doc}", file=sys.stderr)
        return 0
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
