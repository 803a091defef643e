"""The runtimes a model can be timed, planned for and exported to: one :class:`Runtime` record each, in a
registry (as ``torch._dynamo``'s backends are): :func:`register_runtime`, :func:`get_runtime`,
:func:`runtime_names` and :func:`available`, which says in one line why a runtime cannot run here.

Everything that names runtimes reads this registry: the speed table, its memory subprocess and its
report, the planners' A/B timings, ``fxrebirth export --to``, the profile bundles and the command line's
choices. A runtime registered here (in a test, a plug-in) gets all of them with no other edit.

A record names its functions as callables or as ``"package.module:attribute"`` strings resolved at
call time (:func:`resolve`), so that this module imports nothing of fxrebirth and a lowering may live in
a tier above this one. The functions:

* ``runner(target, x) -> run``: ``run()`` runs the model once on ``x``. ``target`` is the module itself,
  or, for a runtime with an ``exporter``, the path of the file that exporter wrote;
* ``exporter(model, x, path, onnx_exporter)``: writes that file (``suffix`` is its extension; runtimes
  with the same suffix share one file per model and batch);
* ``lowering(model, x) -> (model, note)``: rewrites exactly what the runtime has no kernel for;
* ``save(model, x, folder) -> (files, probe)`` and ``load(files, x) -> tensor``: ``fxrebirth export
  --to TARGET`` writes the deployable files and runs them back by the runtime to check them;
* ``cost() -> CostModel``: the cost model the exact tier's gate uses for models run there;
* ``check() -> reason | None``: what else the runtime needs of this machine beyond its package.

Tags: ``plannable`` (a planner can time its candidates there), ``fast`` (a row of the fast speed table),
``export`` (a target of ``fxrebirth export``), ``cost`` (a choice of ``fxrebirth optimize --runtime``),
``device`` (``time_on_device.py`` runs it), ``reference`` (every row is also compared with the original
under it), ``exporter-choice`` (``exporter="auto"`` picks the faster ONNX exporter under it).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from fxrebirth.errors import FxRebirthError

__all__ = ["Runtime", "UnknownRuntime", "DEFAULT_RUNTIME", "register_runtime", "get_runtime", "runtime_names",
           "available", "resolve", "target_names", "for_target", "variants_of"]

Ref = Union[Callable[..., Any], str]
"""A function, or ``"package.module:attribute[.attribute]"`` naming one (imported when first called)."""

DEFAULT_RUNTIME = "eager"
"""The runtime a plan is measured on unless told otherwise: PyTorch eager."""

VARIANTS = ("original", "exact tier", "reborn")
"""The model variants of the speed table, in its order."""


class UnknownRuntime(FxRebirthError, ValueError):
    """A runtime name that no record was registered under."""


def resolve(ref: Ref) -> Callable[..., Any]:
    """The function ``ref`` names: itself, or the attribute a ``"package.module:attribute"`` string names."""
    if callable(ref):
        return ref
    module, _, path = ref.partition(":")
    found: Any = importlib.import_module(module)
    for part in path.split("."):
        found = getattr(found, part)
    return found


@dataclass(frozen=True)
class Runtime:
    """One runtime: how a model gets to it, how it is timed, what it needs (see the module docstring)."""

    name: str
    runner: Ref
    module: str | None = None
    """The Python module it imports (``None``: PyTorch's own); its top-level package must be installed."""
    install: str | None = None
    """What to ``pip install`` for it."""
    precision: str = "f32"
    """The arithmetic it computes in (``f32``, ``bf16``)."""
    exporter: Ref | None = None
    suffix: str = ""
    lowering: Ref | None = None
    baseline: str | None = None
    """The runtime whose original row its rows are compared with ("vs original, same runtime"); None: its own."""
    variants: tuple[str, ...] = ("original", "reborn")
    """The model variants the default speed table times under it."""
    target: str | None = None
    """The name ``fxrebirth export --to`` knows it by (default: its name); with the ``export`` tag."""
    save: Ref | None = None
    load: Ref | None = None
    cost: Ref | None = None
    check: Ref | None = None
    tags: frozenset[str] = field(default_factory=frozenset)
    description: str = ""

    @property
    def package(self) -> str | None:
        """The top-level package of :attr:`module` (what is installed, and what versions are reported of)."""
        return self.module.partition(".")[0] if self.module else None

    @property
    def runs_file(self) -> bool:
        """Whether it runs a file written from the model (``.onnx``, ``.pte``) instead of the module."""
        return self.exporter is not None

    def run(self, target: Any, x: Any) -> Callable[[], object]:
        """A function running ``target`` (the module, or the file its exporter wrote) once on ``x``."""
        return resolve(self.runner)(target, x)

    def export(self, model: Any, x: Any, path: str, onnx_exporter: str = "torchscript") -> None:
        """Write the file this runtime runs to ``path``."""
        if self.exporter is None:
            raise FxRebirthError(f"runtime {self.name!r} runs the module itself and writes no file")
        resolve(self.exporter)(model, x, path, onnx_exporter)

    def lower(self, model: Any, x: Any) -> tuple[Any, str]:
        """``model`` as this runtime can run it and a note on what was rewritten ("" for nothing)."""
        return resolve(self.lowering)(model, x) if self.lowering is not None else (model, "")

    def cost_model(self) -> Any:
        """The exact tier's cost model for a model run here (the default roofline model unless set)."""
        return resolve(self.cost or "fxrebirth.rewrite.cost:RooflineCost")()


_REGISTRY: dict[str, Runtime] = {}


def register_runtime(runtime: Runtime, replace: bool = False) -> Runtime:
    """Add ``runtime`` to the registry (after the others: :func:`runtime_names` keeps the order); a name
    already taken is refused unless ``replace``."""
    if not isinstance(runtime, Runtime):
        raise TypeError(f"register_runtime takes a Runtime record, not a {type(runtime).__name__}")
    if runtime.name in _REGISTRY and not replace:
        raise FxRebirthError(f"runtime {runtime.name!r} is already registered; pass replace=True to replace it")
    unknown = sorted(set(runtime.variants) - set(VARIANTS))
    if unknown:
        raise FxRebirthError(f"runtime {runtime.name!r}: unknown model variant(s) {unknown}; use {list(VARIANTS)}")
    _REGISTRY[runtime.name] = runtime
    return runtime


def get_runtime(name: str) -> Runtime:
    """The record registered as ``name``; :class:`UnknownRuntime` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownRuntime(f"unknown runtime {name!r}; known: {', '.join(_REGISTRY)}") from None


def runtime_names(tag: str | None = None) -> tuple[str, ...]:
    """The registered runtimes (those with ``tag`` when given), in the order they were registered."""
    return tuple(name for name, runtime in _REGISTRY.items() if tag is None or tag in runtime.tags)


def available(name: str) -> str | None:
    """Why runtime ``name`` cannot run here, in one line, or None when it can."""
    runtime = get_runtime(name)
    if runtime.package is not None and importlib.util.find_spec(runtime.package) is None:
        return f"{runtime.package} is not installed (pip install '{runtime.install or runtime.package}')"
    return resolve(runtime.check)() if runtime.check is not None else None


def target_names() -> tuple[str, ...]:
    """The names ``fxrebirth export --to`` takes: those of the runtimes tagged ``export``."""
    return tuple(get_runtime(name).target or name for name in runtime_names("export"))


def for_target(target: str) -> Runtime:
    """The runtime ``fxrebirth export --to target`` writes for; an error naming the targets otherwise."""
    for name in runtime_names("export"):
        if (get_runtime(name).target or name) == target:
            return get_runtime(name)
    raise UnknownRuntime(f"unknown export target {target!r}; use one of {', '.join(target_names())}")


def variants_of(names: tuple[str, ...] | list[str] | None = None) -> list[tuple[str, str]]:
    """The speed table's (model variant, runtime) pairs of ``names`` (default: every runtime): the
    originals first, then the exact tier, then the reborn model, each in registration order."""
    chosen = runtime_names() if names is None else [get_runtime(n).name for n in names]
    return [(v, r) for v in VARIANTS for r in runtime_names() if r in chosen and v in get_runtime(r).variants]


def _compile_openvino(model: Any, x: Any) -> Callable[[], object]:
    """``torch.compile(backend="openvino")`` (the backend OpenVINO registers with torch) on the CPU, f32,
    latency hint, torch's thread count."""
    import openvino.torch  # noqa: F401 - registers the backend
    import torch

    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": str(torch.get_num_threads())}
    return resolve(_M + "compiled_runner")(model, x, backend="openvino", options={"device": "CPU", "config": config})


_M, _D, _F = "fxrebirth.measure.runners:", "fxrebirth.measure.deploy:", "fxrebirth.frontends.deploy:"
_ORT = dict(module="onnxruntime", install="fxrebirth[onnx]", exporter=_M + "export_onnx", suffix=".onnx")
_OV = dict(module="openvino", install="fxrebirth[openvino]", exporter=_M + "export_onnx", suffix=".onnx",
           lowering=_F + "CEIL_POOL_PADDED")

for _runtime in (
    Runtime(DEFAULT_RUNTIME, _M + "eager_runner", variants=VARIANTS, tags=frozenset({"plannable", "fast", "cost"}),
            description="PyTorch eager under torch.inference_mode()"),
    Runtime("fx fuse", _M + "fx_fuse_runner", baseline=DEFAULT_RUNTIME, variants=("original",),
            description="torch.fx.experimental.optimization.fuse (folds Conv+BN), eager"),
    Runtime("inductor+freezing", _M + "inductor_runner", variants=("original",), tags=frozenset({"plannable"}),
            description="torch.compile with Inductor's freezing config on"),
    Runtime("compile(fxrebirth)", _M + "fxrebirth_compile_runner", baseline="inductor+freezing",
            description='torch.compile(backend="fxrebirth"): the exact tier, then Inductor with freezing'),
    Runtime("onnxruntime", _M + "ort_runner", **_ORT, target="onnx", save=_D + "save_onnx", load=_D + "load_onnx",
            cost="fxrebirth.rewrite.cost:RooflineCost.onnxruntime",
            tags=frozenset({"plannable", "fast", "export", "cost", "device", "reference", "exporter-choice"}),
            description="ONNX Runtime's CPU provider, every graph optimisation, spinning off"),
    Runtime("openvino", _D + "openvino_runner", **_OV, save=_D + "save_openvino", load=_D + "load_openvino",
            tags=frozenset({"plannable", "export", "device"}),
            description="OpenVINO's CPU plugin on the ONNX file, f32 forced"),
    Runtime("openvino bf16", _D + "openvino_bf16_runner", **_OV, precision="bf16", check=_D + "openvino_bf16_missing",
            tags=frozenset({"plannable"}), description="OpenVINO's CPU plugin on the ONNX file, bf16"),
    Runtime("compile(openvino)", "fxrebirth.measure.runtimes:_compile_openvino", module="openvino", install="fxrebirth[openvino]",
            tags=frozenset({"plannable"}), description='torch.compile(backend="openvino"), f32'),
    Runtime("executorch", _D + "executorch_file_runner", module="executorch.runtime", install="fxrebirth[executorch]",
            exporter=_D + "write_pte", suffix=".pte", lowering=_F + "LRN_AS_AVG_POOL", variants=VARIANTS,
            save=_D + "save_pte", load=_D + "load_pte", tags=frozenset({"plannable", "export"}),
            description="a .pte lowered to XNNPACK, run by ExecuTorch's runtime"),
):
    register_runtime(_runtime)
