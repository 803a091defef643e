"""What ``torch.compile(backend="fxrebirth")`` adds per call, and what it hands the inner compiler.

Not collected by the plain test command. Run::

    python -m benchmarks.backend_overhead [--models resnet50 regnet_y_400mf mobilenet_v3_large] [--calls 20000]

For each torchvision model (random weights, eval mode, batch 1 at 224x224, under ``torch.no_grad()``):

* **the graph Inductor receives**: Dynamo's graph is captured, then handed to the backend with its inner
  compiler replaced by a recorder. Printed: the call nodes of Dynamo's graph and of the recorded one, by
  target, and how many inputs each takes; with every rule disabled the two should hold the same calls
  (the backend turns weight inputs into constants, and in-place ops such as ``iadd`` into their
  out-of-place forms, which Inductor receives functionalised anyway);
* **the per-call overhead** of each guard (:data:`fxrebirth.frontends.backend.GUARDS`): the backend's
  wrapper around a compiled function that does nothing, against calling that function directly, in
  microseconds per call (median of 5 batches of ``--calls`` calls, all variants interleaved), with the
  spread of the 5 batches.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from typing import Any

import torch

from benchmarks._common import torchvision_model
from fxrebirth.frontends import backend

MODELS = ("resnet50", "regnet_y_400mf", "mobilenet_v3_large")


def _dynamo_graph(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, list[Any]]:
    """Dynamo's graph of ``model`` and the inputs it is called with (the weights among them)."""
    seen: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def grab(gm, inputs):
        seen.append((gm, list(inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab, dynamic=False)(x)
    return seen[0]


_IN_PLACE = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "truediv"}


def _calls(gm: torch.fx.GraphModule) -> collections.Counter:
    names = (str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes
             if n.op in ("call_function", "call_method", "call_module"))
    return collections.Counter(_IN_PLACE.get(name, name) for name in names)


def _per_call_us(run, args: list[Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run(*args)
    return (time.perf_counter() - start) / calls * 1e6


def measure(name: str, calls: int, guards: tuple[str, ...] = backend.GUARDS) -> dict[str, Any]:
    model = torchvision_model(name, seed=1).eval()
    x = torch.randn(1, 3, 224, 224)
    gm, inputs = _dynamo_graph(model, x)
    received: list[torch.fx.GraphModule] = []
    nothing = lambda *args: None  # noqa: E731 - the compiled function whose cost is none
    real_inner = backend._inner
    backend._inner = lambda compiler, freezing=False: (lambda g, i: (received.append(g), nothing)[1])
    disabled = [r.name for r in backend.default_rules()]
    try:
        with torch.no_grad():
            wrapped = {guard: backend.fxrebirth_backend(gm, inputs, {"disable": disabled, "guard": guard})
                       for guard in guards}
    finally:
        backend._inner = real_inner
    same_calls = _calls(gm) == _calls(received[0])
    runs = {"direct": nothing, **wrapped}
    rounds: dict[str, list[float]] = {key: [] for key in runs}
    with torch.no_grad():
        for _ in range(5):  # interleaved: each batch of calls of every variant in turn
            for key, run in runs.items():
                rounds[key].append(_per_call_us(run, inputs, calls))
    median = {key: statistics.median(values) for key, values in rounds.items()}
    return {"model": name, "dynamo_inputs": len(inputs),
            "inner_inputs": sum(1 for n in received[0].graph.nodes if n.op == "placeholder"),
            "same_calls_with_no_rule": same_calls, "direct_us": round(median["direct"], 3),
            "overhead_us": {guard: round(median[guard] - median["direct"], 3) for guard in guards},
            "spread_us": {guard: round(max(rounds[guard]) - min(rounds[guard]), 3) for guard in guards}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for model_name in args.models:
        print(json.dumps(measure(model_name, args.calls)))
