"""Errors fxrebirth raises for bad input: each names the module or node at fault and what to do."""

from __future__ import annotations

__all__ = ["FxRebirthError", "CaptureError", "PipelineError"]


class FxRebirthError(Exception):
    """Base class of every error fxrebirth raises on purpose."""


class CaptureError(FxRebirthError):
    """The model could not be turned into the canonical graph (untraceable code, bad example inputs)."""


class PipelineError(FxRebirthError):
    """A pipeline was configured or used wrongly (unknown rule name, a rule that broke the graph)."""
