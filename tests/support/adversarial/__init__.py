"""An adversarial catalog for :func:`fxrebirth.optimize`: models written to break a graph compiler.

Each :class:`Case` builds a fresh model (eval mode, seeded random weights, BatchNorms randomised so that
folds are not near-identity), its inputs at any ``(batch, size)``, the sizes to check, the options given
to ``optimize`` and the example ``(batch, size)`` it is optimised at. :func:`run_case` classifies what
happens (:class:`Outcome`):

* ``"mutated"``: ``optimize`` modified the user's model (parameter or buffer values or identities,
  plain tensor attributes, submodules, hooks, training flags), the example inputs, or global torch state;
* ``"crash"``: ``optimize`` or the returned module raised anything but :class:`fxrebirth.FxRebirthError`
  (or refused to run at the example's own size: batch and example shape must never be guarded);
* ``"wrong"``: at some size the result differs from a copy of the original beyond
  ``tolerance(output dtype)`` (outputs, the inputs after the call for models that mutate them, state
  such as buffers a forward increments, side effects such as hooks recording into a list, the output's
  memory format where the case asks for it);
* ``"refused"``: ``optimize`` raised :class:`fxrebirth.FxRebirthError` (a clear error: acceptable);
* ``"ok"``: otherwise; sizes at which the result raised a :class:`fxrebirth.FxRebirthError` (a shape
  guard) are listed in ``Outcome.guarded`` (acceptable).

The catalog also runs against older fxrebirth versions (no :mod:`fxrebirth.equivalence`, no
``ShapeGuardError``), so that before/after counts can be compared
(``benchmarks/adversarial_sweep.py``).

The catalog is a package, one module per concern: :mod:`.records` (:class:`Case`, :class:`Outcome`,
the classes and statuses), :mod:`.compat` (what it takes from fxrebirth, with fallbacks),
:mod:`.builders` (seeded inputs and models), one module per class of cases (:mod:`.inplace`,
:mod:`.hooks`, :mod:`.shapes`, :mod:`.verification`, :mod:`.dtypes`, :mod:`.inputs`, :mod:`.own`),
:mod:`.catalog` (:data:`CASES` in order), :mod:`.snapshots` (what counts as a mutation) and
:mod:`.runner` (:func:`run_case`).
"""

from __future__ import annotations

from tests.support.adversarial.builders import conv_bn, images
from tests.support.adversarial.catalog import CASES, cases
from tests.support.adversarial.compat import (
    FxRebirthError,
    ShapeGuardError,
    randomize_batchnorm,
    relative_error,
    tolerance,
)
from tests.support.adversarial.records import CLASSES, STATUSES, Case, Outcome, Size
from tests.support.adversarial.runner import run_case

__all__ = ["CLASSES", "STATUSES", "Case", "Outcome", "CASES", "cases", "run_case", "relative_error", "tolerance"]
