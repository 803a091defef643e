"""The retraining tier: planning which marked regions to merge, rebirth layers, their initialisation, the
training engine, its report, training helpers and datasets.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph, fxrebirth.rewrite, fxrebirth.passes, fxrebirth.measure.
"""

from fxrebirth.retraining import strategies as _builtin  # noqa: E402,F401 - registers streamline, branch, depth
