"""Errors fxrebirth raises for bad input: each names the module or node at fault and what to do."""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Iterator

__all__ = ["FxRebirthError", "CaptureError", "PipelineError", "EquivalenceError", "ShapeGuardError", "first_line",
           "held_stderr"]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name when
    it has none: what a one-line error quotes of an error from inside torch."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


@contextlib.contextmanager
def held_stderr() -> Iterator[None]:
    """Hold back what the block writes to ``sys.stderr``: written out if the block succeeds, dropped if it
    raises. For running a model only to learn whether it accepts an input: a ``torch.fx.GraphModule``
    that raises prints its generated code around the failing line to stderr before the exception
    propagates, which for a probe that is expected to fail is noise; a warning the model writes on a
    run that succeeds still reaches the user."""
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())


class FxRebirthError(Exception):
    """Base class of every error fxrebirth raises on purpose."""


class CaptureError(FxRebirthError):
    """The model could not be turned into the canonical graph (untraceable code, bad example inputs)."""


class PipelineError(FxRebirthError):
    """A pipeline was configured or used wrongly (unknown rule name, a rule that broke the graph)."""


class EquivalenceError(FxRebirthError):
    """The optimised model does not match the original within the tolerance of
    :mod:`fxrebirth.equivalence`; the message names the rewrite found responsible."""


class ShapeGuardError(FxRebirthError):
    """At run time: an input size at which a rewrite that depends on the size would be wrong. The
    message names the rewrite and its condition; optimise again with an example of that size."""
