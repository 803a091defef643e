"""How the exact tier's own time grows with graph size: synthetic CNN graphs of 1k, 5k and 10k nodes.

Not collected by the plain test command. Run::

    python -m benchmarks.pipeline_scaling [--sizes 1000 5000 10000] [--repeats 3]
    pytest benchmarks/pipeline_scaling.py

Graphs come from :func:`fxrebirth.testing.graphs.synthetic_cnn` (conv/BN/ReLU, RepVGG-style sums,
inception-style concatenations, constant scale/shift, avg-pool -> conv; 4 channels at 6x6, so that the
time measured is the pipeline's, not the convolutions'). For each size: capture (trace, lowering,
normalisation, one shape-recording run), the passes with per-rewrite float64 verification (and the
verification's share), the passes without verification, and the whole-output check; best of
``repeats``, with microseconds per node to show whether growth is linear.
"""

from __future__ import annotations

import argparse
import time

import torch

import fxrebirth
from fxrebirth.testing.graphs import synthetic_cnn

SIZES = (1000, 5000, 10000)


def measure(nodes: int, repeats: int = 3) -> dict[str, float]:
    gm = synthetic_cnn(nodes)
    x = torch.randn(1, 4, 6, 6)
    best: dict[str, float] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        _, verified = fxrebirth.optimize(gm, x, check_output=False)
        total = time.perf_counter() - start
        _, unverified = fxrebirth.optimize(gm, x, verify=False, check_output=False)
        row = {"nodes": len(gm.graph.nodes), "rewrites": verified.rewrites, "capture_s": verified.capture_s,
               "passes_s": verified.passes_s, "verify_s": verified.verify_s, "total_s": total,
               "passes_unverified_s": unverified.passes_s}
        if not best or row["total_s"] < best["total_s"]:
            best = row
    return best


try:
    import pytest

    @pytest.mark.parametrize("nodes", SIZES)
    def test_pipeline_scaling(benchmark, nodes):
        gm = synthetic_cnn(nodes)
        x = torch.randn(1, 4, 6, 6)
        benchmark.pedantic(lambda: fxrebirth.optimize(gm, x, verify=False, check_output=False), rounds=3,
                           iterations=1)
except ImportError:  # pragma: no cover - running as a script without pytest
    pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats}")
    print(f"{'nodes':>7} {'rewrites':>9} {'capture s':>10} {'passes s':>9} {'of which verify s':>18} "
          f"{'passes, no verify s':>20} {'total s':>8} {'us/node':>8}")
    for size in args.sizes:
        r = measure(size, args.repeats)
        print(f"{r['nodes']:>7} {r['rewrites']:>9} {r['capture_s']:>10.2f} {r['passes_s']:>9.2f} "
              f"{r['verify_s']:>18.2f} {r['passes_unverified_s']:>20.2f} {r['total_s']:>8.2f} "
              f"{r['total_s'] / r['nodes'] * 1e6:>8.0f}")
