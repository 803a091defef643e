"""Deprecated module paths of fxrebirth 0.1, kept working for one release (removed in 0.3).

0.2 moved the flat modules into folders, one per tier (see docs/architecture.md). Importing an old path
(``import fxrebirth.cost``, ``from fxrebirth.export import optimize_exported``) still works: a finder
placed first on ``sys.meta_path`` answers for exactly the names in :data:`MOVED`, warns once with a
DeprecationWarning naming the new path, and hands back the new module itself (one module object under
two names, so ``isinstance`` checks and monkeypatching agree). Nothing inside fxrebirth imports an old
path, so ``import fxrebirth`` and ``torch.compile(backend="fxrebirth")`` warn about nothing.

``fxrebirth.plan``, ``fxrebirth.rebirth`` and ``fxrebirth.capture`` have no shim: they are the package's
public functions, and a module of the same name would replace the function on import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "fxrebirth.api": "fxrebirth.frontends.library",
    "fxrebirth.backend": "fxrebirth.frontends.backend",
    "fxrebirth.export": "fxrebirth.frontends.export",
    "fxrebirth.ops": "fxrebirth.graph.ops",
    "fxrebirth.aten": "fxrebirth.graph.aten",
    "fxrebirth.metadata": "fxrebirth.graph.metadata",
    "fxrebirth.mutation": "fxrebirth.graph.mutation",
    "fxrebirth.variants": "fxrebirth.graph.variants",
    "fxrebirth.guards": "fxrebirth.graph.guards",
    "fxrebirth.regions": "fxrebirth.graph.regions",
    "fxrebirth.rules": "fxrebirth.rewrite.rules",
    "fxrebirth.pipeline": "fxrebirth.rewrite.pipeline",
    "fxrebirth.verify": "fxrebirth.rewrite.verify",
    "fxrebirth.cost": "fxrebirth.rewrite.cost",
    "fxrebirth.report": "fxrebirth.rewrite.report",
    "fxrebirth.endtoend": "fxrebirth.rewrite.endtoend",
    "fxrebirth.validate": "fxrebirth.rewrite.validate",
    "fxrebirth.bench": "fxrebirth.measure.timing",
    "fxrebirth.speed": "fxrebirth.measure.speed",
    "fxrebirth.initialise": "fxrebirth.retraining.initialise",
    "fxrebirth.retrain": "fxrebirth.retraining.engine",
    "fxrebirth.rebirth_report": "fxrebirth.retraining.report",
    "fxrebirth.train": "fxrebirth.retraining.train",
    "fxrebirth.trainbn": "fxrebirth.retraining.batchnorm",
    "fxrebirth.models": "fxrebirth.paper.models",
    "fxrebirth.data": "fxrebirth.paper.data",
    "fxrebirth.teacher": "fxrebirth.paper.teacher",
    "fxrebirth.runner": "fxrebirth.paper.runner",
}
"""Old module path -> its home since 0.2."""


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new} in fxrebirth 0.2; the old path goes in 0.3",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported under its new name."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader())


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
