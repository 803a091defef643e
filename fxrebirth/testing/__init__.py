"""Test helpers used by fxrebirth's own tests, and meant for users proving their own rules.

* :func:`assert_equivalent` compares two models on the same inputs with the per-dtype tolerance
  table :data:`TOLERANCES` (norm-wise relative error ``max|a - b| / max|b|``);
* :func:`count_kind` counts canonical nodes of a kind in a GraphModule;
* :mod:`fxrebirth.testing.strategies` (needs ``hypothesis``: ``pip install fxrebirth[testing]``) draws
  layer hyper-parameters and the modules built from them;
* :func:`fxrebirth.testing.kit.check_rule` is a rule's property proof; :mod:`fxrebirth.testing.graphs` draws
  random graphs from an op vocabulary you can extend.

The project's own adversarial catalogue, random-program generator and model zoo are not part of the
package: they live in the repository's ``tests/support/``.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph, fxrebirth.rewrite, fxrebirth.passes, fxrebirth.measure, fxrebirth.frontends.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxrebirth.equivalence import TOLERANCES, relative_error, tolerance
from fxrebirth.graph.capture import as_input_tuple
from fxrebirth.graph.ops import kind_of

__all__ = ["TOLERANCES", "tolerance", "assert_equivalent", "count_kind", "randomize_batchnorm"]

def _output_dtype(output: Any) -> torch.dtype:
    if isinstance(output, torch.Tensor):
        return output.dtype
    if isinstance(output, dict):
        output = list(output.values())
    for item in output if isinstance(output, (list, tuple)) else ():
        dtype = _output_dtype(item)
        if dtype is not None:
            return dtype
    return torch.float32


def assert_equivalent(
    original: torch.nn.Module,
    rewritten: torch.nn.Module,
    inputs: Any,
    *,
    rtol: float | None = None,
    msg: str = "",
) -> float:
    """Run both models on ``inputs`` (no grad) and assert their outputs agree; return the error.

    The tolerance is ``rtol`` or the :data:`TOLERANCES` entry of the original output's dtype.
    """
    inputs = as_input_tuple(inputs)
    with torch.no_grad():
        expected = original(*inputs)
        actual = rewritten(*inputs)
    bound = rtol if rtol is not None else tolerance(_output_dtype(expected))
    error = relative_error(expected, actual)
    if not error <= bound:
        raise AssertionError(f"{msg + ': ' if msg else ''}relative error {error:.3e} exceeds {bound:.1e}")
    return error


def count_kind(gm: fx.GraphModule, kind: str) -> int:
    """Number of canonical nodes of ``kind`` (``"batch_norm"``, ``"conv"``...) in ``gm``."""
    return sum(1 for n in gm.graph.nodes if kind_of(n) == kind)


def randomize_batchnorm(model: torch.nn.Module, generator: torch.Generator | None = None) -> torch.nn.Module:
    """Give every BatchNorm random statistics and affine parameters, in place; return the model.

    Freshly built models have mean 0, variance 1, weight 1 and bias 0, which makes folding nearly the
    identity and hides bugs; this draws means in [-1, 1), variances in [0.25, 2), weights in [0.5, 1.5)
    and biases in [-1, 1).
    """
    generator = generator or torch.Generator().manual_seed(0)

    def draw(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) * (high - low) + low)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                if m.running_mean is not None:
                    draw(m.running_mean, -1.0, 1.0)
                    draw(m.running_var, 0.25, 2.0)
                if m.weight is not None:
                    draw(m.weight, 0.5, 1.5)
                    draw(m.bias, -1.0, 1.0)
    return model
