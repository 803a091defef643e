"""What "equivalent" means in fxrebirth: one definition, cited by the rules, the pipeline, the tests and
the docs (docs/testing.md).

* **Local checks** (one rewrite, float64, random activations): relative error <= :data:`LOCAL_TOLERANCE`
  (1e-9; correct rewrites measure ~1e-15).
* **Whole models**: the norm-wise relative error ``max|a - b| / max|b|`` (:func:`relative_error`) is at
  most :func:`tolerance` of the dtype the model stores its weights in (:data:`TOLERANCES`): float32 1e-5,
  float16 1e-2, bfloat16 4e-2 (their 3 and 2 significant digits), float64 1e-10.
* **Models float32 cannot evaluate to that bound** (the original's own float32 output is further than
  the bound from its float64 output): the rewrites are proven on a *float64 twin* (the same rewrites, to
  the same code, on a float64 copy: within the bound of the stored dtype), and the optimised model is
  given the twin's weights rounded to its own dtype. It is then the exact model with each weight stored
  as precisely as its dtype allows (:data:`WEIGHT_ROUNDING`); what its output still differs by is the
  model's own amplification of rounding, reported beside the original's (tests/test_rounding.py).
* **What users see, in the model's dtype** (the rounding criterion, :mod:`fxrebirth.rewrite.precision`):
  the float64 checks prove the algebra, not what float32 makes of it (a large shift folded into the
  following layer is exact, and cancels in float32). The optimised model run in its own dtype (under the
  caller's autocast, if any) must be within ``max(tolerance(dtype), NOISE_FACTOR * e)`` of the original's
  float64 output, ``e`` being the original's own distance from it in that dtype: judged at the check's
  first input, and on :data:`NOISE_SAMPLES` samples before a rewrite is refused (then rolled back).
  ``Report.output_error`` is the optimised model against the original, both in the model's dtype (the
  float64 figure is ``output_error64``). Gradients are compared too where the model trains
  (``frozen=False``; :func:`fxrebirth.rewrite.endtoend.gradient_error`, float64, the same bound).
* **Inputs**: always at batch >= :data:`MIN_BATCH` (a batch-1 example cannot tell a rule that mixes
  samples from a correct one), and, for rewrites whose exactness depends on the input size, at more than
  one size; a model that runs only at its example's batch (a flatten into a Linear sized for it) is
  checked at the example, and the report says why.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

__all__ = ["LOCAL_TOLERANCE", "MIN_BATCH", "TOLERANCES", "NOISE_FACTOR", "NOISE_SAMPLES", "WEIGHT_ROUNDING", "unit_roundoff", "tolerance", "relative_error", "identical", "flush_denormals"]

LOCAL_TOLERANCE = 1e-9
"""Largest accepted float64 relative error of one rewrite checked locally (correct ones measure ~1e-15)."""

MIN_BATCH = 2
"""Every check runs at a batch of at least this many samples, whatever the example's batch."""

TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}
"""Largest accepted norm-wise relative error of a whole model, by the dtype the model computes in.

float64 is tight enough to expose an algebra bug (correct folds measure ~1e-15); float32 allows the
extra rounding of folded weights and a different summation order (measured ~3e-7 on torchvision
models, bound 1e-5); half precisions are bounded by their 3 (bfloat16: 2) significant digits."""

NOISE_FACTOR = 8.0
"""How many times the original's own rounding error (in its dtype, against its float64 output) the
optimised model may have, where that is above the dtype's tolerance. Measured (benchmarks/float32_noise.py,
docs/data/float32_noise.json, 14 torchvision and timm models at 64x64, 8 inputs each): the optimised
model's float32 error is 0.76-1.51 times the original's at every input, 1.8e-7-1.6e-6, at least 6 times
below the float32 bound; on the ill-conditioned models of tests/test_rounding.py (a 1e4 offset folded,
then removed, the original itself 4e-4 from exact) 0.6-1.2 times on an AVX-512 CPU, and above 2 on an
AVX2 one (the folded bias is summed in at another step). A fold that cancels measures 10 to 10,000."""

NOISE_SAMPLES = 8
"""Samples (inputs) the rounding criterion judges on before it refuses a model."""


WEIGHT_ROUNDING = 8.0
"""How far a weight tensor in a low precision may be from its exact (float64) value and still count as
that value rounded: ``max|w - exact| <= WEIGHT_ROUNDING * u * max|exact|``, with ``u`` the unit roundoff
of its dtype (``finfo.eps / 2``; 2**-24 for float32). Rounding each element to nearest stays within 1;
a fold computed in the low precision adds a few roundings (0.94 measured on torchvision's
efficientnet_b4); a wrong fold is thousands of units off (a 1e-4 relative error is 1,700 in float32)."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the gap between 1 and the next number of ``dtype``: the largest relative error of rounding to it."""
    return torch.finfo(dtype).eps / 2


def tolerance(dtype: torch.dtype) -> float:
    """The :data:`TOLERANCES` entry for ``dtype`` (float32's for anything not listed)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def relative_error(reference: Any, candidate: Any) -> float:
    """Norm-wise relative error ``max|a - b| / max|b|`` over (nested) tensor outputs.

    Positions where both hold the same infinity, or both hold NaN, count as equal; the scale is taken
    over the finite values of ``reference``. A shape or structure mismatch is an infinite error; so is a
    floating-point result against an integer one.
    """
    if isinstance(reference, torch.Tensor):
        if not isinstance(candidate, torch.Tensor) or candidate.shape != reference.shape:
            return float("inf")
        if reference.is_floating_point() != candidate.is_floating_point():
            return float("inf")
        ref = reference.detach().double()
        cand = candidate.detach().double().to(ref.device)
        if ref.numel() == 0:
            return 0.0
        gap = (cand - ref).abs()
        if bool(torch.isfinite(gap).all()):  # the common case: then every value of ``ref`` is finite too
            scale, worst = ref.abs().max().item(), gap.max().item()
            return worst / scale if scale > 0 else worst
        same = (ref == cand) | (torch.isnan(ref) & torch.isnan(cand))
        diff = torch.where(same, torch.zeros_like(ref), (cand - ref).abs())
        if torch.isnan(diff).any():
            return float("inf")
        finite = ref[torch.isfinite(ref)]
        scale = finite.abs().max().item() if finite.numel() else 0.0
        worst = diff.max().item()
        return worst / scale if scale > 0 else worst
    if isinstance(reference, dict):
        if not isinstance(candidate, dict) or set(reference) != set(candidate):
            return float("inf")
        return max((relative_error(reference[k], candidate[k]) for k in reference), default=0.0)
    if isinstance(reference, (list, tuple)):
        if not isinstance(candidate, (list, tuple)) or len(reference) != len(candidate):
            return float("inf")
        return max((relative_error(a, b) for a, b in zip(reference, candidate)), default=0.0)
    try:
        return 0.0 if bool(reference == candidate) else float("inf")
    except Exception:  # noqa: BLE001 - objects whose comparison is not a truth value
        return float("inf")


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same shape, dtype and values, NaN equal to NaN: whether a tensor was left unchanged."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _flushing() -> bool:
    """Is the CPU flushing denormals now? torch has a setter only, so ask the arithmetic: with flushing on,
    a denormal input reads as zero."""
    return (torch.full((1,), 1e-310, dtype=torch.float64) * 1.0).item() == 0.0


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Run fxrebirth's own checks with denormal numbers flushed to zero, and restore the caller's setting.

    Freshly initialised models are full of tiny values (timm's layer scales start at 1e-5; products of
    them reach the denormal range in float64 and float32), and CPU arithmetic on denormals is one to two
    orders of magnitude slower: measured (with another job on the machine), optimising an untrained timm
    fastvit_t8 at 96x96 took 539 s, 35 s with flushing set before torch started its worker threads. The
    flag is per thread and workers keep the one they started with, so inside a process that already ran
    parallel ops this context only helps the calling thread (280 s in the same conditions); setting
    ``torch.set_flush_denormal(True)`` at the start of a script helps everywhere. A flushed denormal changes a value by less than 2.3e-308 (float64) or 1.2e-38 (float32),
    far below every tolerance here; the model the user gets back runs with the caller's setting.
    """
    before = _flushing()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
