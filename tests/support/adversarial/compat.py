"""What the catalog takes from fxrebirth to judge a result: the errors it raises on purpose, the shared
definition of "equivalent" (:func:`relative_error`, :func:`tolerance`) and :func:`randomize_batchnorm`,
each with a fallback for older fxrebirth versions (no :mod:`fxrebirth.equivalence`, no
``ShapeGuardError``), so that before/after counts can be compared."""

from __future__ import annotations

import torch

import fxrebirth.errors as _errors

__all__ = ["FxRebirthError", "ShapeGuardError", "randomize_batchnorm", "relative_error", "tolerance"]

try:  # the shared definition of "equivalent"
    from fxrebirth.equivalence import relative_error, tolerance
except ImportError:  # older fxrebirth (before fxrebirth.equivalence)
    from fxrebirth.frontends.library import relative_error

    _FALLBACK_TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}

    def tolerance(dtype: torch.dtype) -> float:
        return _FALLBACK_TOLERANCES.get(dtype, 1e-5)

try:
    from fxrebirth.testing import randomize_batchnorm
except ImportError:  # pragma: no cover - every supported version has it
    randomize_batchnorm = None  # type: ignore[assignment]

FxRebirthError = _errors.FxRebirthError
ShapeGuardError = getattr(_errors, "ShapeGuardError", None)
