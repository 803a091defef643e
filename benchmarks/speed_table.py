"""The speed table for the paper's network: the original under every runtime people use, against
fxrebirth's exact tier and the reborn model, side by side in one process.

Not collected by the plain test command. Run::

    python -m benchmarks.speed_table [--rounds 20] [--batch 1 8] [--model googlenet_lrn]
    pytest benchmarks/speed_table.py

The script is ``fxrebirth bench`` (fxrebirth/measure/speed.py does the work): the original under eager,
``torch.fx.experimental.optimization.fuse``, Inductor with freezing, ``torch.compile(backend="fxrebirth")``
and ONNX Runtime (the faster exporter); the exact tier; the reborn model (every planned region replaced by
a freshly initialised rebirth layer: latency does not depend on the weights' values) under eager, the
fxrebirth backend and ONNX Runtime; size on disk, inference memory (a process per variant) and FLOPs.
The pytest-benchmark form times each (model variant, runtime) at batch 1 on its own, for regression
tracking; quote the script's interleaved ratios.
"""

from __future__ import annotations

import argparse
import sys

import torch

import fxrebirth
from fxrebirth.graph.capture import capture
from fxrebirth.paper.models import googlenet_lrn
from fxrebirth.retraining.planning import rebuild
from fxrebirth.measure.runtimes import variants_of
from fxrebirth.measure.speed import runtime_runner

try:
    import pytest

    @pytest.fixture(scope="module")
    def models():
        torch.manual_seed(0)
        model = googlenet_lrn(1000).eval()
        x = torch.randn(1, 3, 224, 224)
        plan = fxrebirth.plan(model, x, strategies=["streamline", "branch"], rounds=3)  # the paper's
        return {"original": model, "exact tier": fxrebirth.optimize(model, x)[0],
                "reborn": rebuild(capture(model, (x,)), plan).eval()}, x

    @pytest.mark.parametrize("variant,runtime", variants_of(), ids=[f"{v}-{r}" for v, r in variants_of()])
    def test_speed_table(benchmark, models, variant, runtime, tmp_path):
        nets, x = models
        run = runtime_runner(nets[variant], runtime, x, str(tmp_path))
        for _ in range(3):
            run()
        benchmark.pedantic(run, rounds=15, iterations=1)
except ImportError:  # pragma: no cover - running as a script without pytest
    pass


if __name__ == "__main__":
    from fxrebirth.cli import main

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--model", default="googlenet_lrn")
    args = parser.parse_args()
    sys.exit(main(["bench", args.model, "--rounds", str(args.rounds), "--batch", *map(str, args.batch),
                   "--layers"]))
