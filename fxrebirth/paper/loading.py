"""Models by name for the command line: the paper's networks (``googlenet_lrn``, ``alexnet_lrn``),
torchvision classification models and timm's (``timm:NAME``, or a timm name torchvision lacks; both built without
weights: nothing is downloaded) and factory paths (``package.module:factory``), with the user's weights; each
failure a one-line :class:`~fxrebirth.errors.FxRebirthError` (weights that do not fit name the keys and shapes
that differ).
"""

from __future__ import annotations

import importlib
import os
import pickle

import torch
from torch import nn

from fxrebirth.errors import FxRebirthError, first_line
from fxrebirth.retraining.folders import model_mean_std

__all__ = ["PAPER_MODELS", "load_model", "load_weights", "load_trained", "model_mean_std", "state_mismatch"]


PAPER_MODELS = ("googlenet_lrn", "alexnet_lrn")


def load_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """A model from the paper's networks (``googlenet_lrn``, ``alexnet_lrn``), a torchvision name
    (``resnet50``), a timm name (``timm:convnext_atto``; a name torchvision lacks needs no prefix) or a factory
    path (``package.module:factory``, called with ``num_classes=`` when that is given); ``num_classes`` sizes its
    classifier (default: the architecture's, 1000 for torchvision's and timm's).

    torchvision and timm models are built without pretrained weights: nothing is downloaded.
    """
    classes = {} if num_classes is None else {"num_classes": num_classes}
    if spec.endswith(".pt2"):
        raise FxRebirthError(f"{spec}: a torch.export program has fixed shapes and cannot switch to training, so it "
                             "cannot be retrained; give its architecture (a name or package.module:factory) and "
                             "--weights with its state_dict")
    if spec in PAPER_MODELS:
        from fxrebirth.paper import models

        return getattr(models, spec)(**classes)
    if spec.startswith("timm:"):
        model = _timm_model(spec[len("timm:"):], classes)
    elif ":" in spec:
        model = _factory_model(spec, classes)
    else:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if spec not in names:
            if _timm_has(spec):
                return _timm_model(spec, classes)
            raise FxRebirthError(
                f"unknown model {spec!r}: give one of the paper's networks ({', '.join(PAPER_MODELS)}), a "
                f"torchvision classification model name (e.g. {', '.join(names[:4])}, ...), timm:NAME for a timm "
                "model, or a factory as package.module:function"
            )
        kwargs = {"init_weights": False} if spec in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(spec, weights=None, **kwargs, **classes)
    if not isinstance(model, nn.Module):
        raise FxRebirthError(f"{spec!r} did not produce a torch.nn.Module (got {type(model).__name__})")
    return model


def _factory_model(spec: str, classes: dict) -> object:
    """What the factory ``package.module:function`` returns (called with ``classes``), or a one-line error."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise FxRebirthError(f"cannot load factory {spec!r}: {exc}") from None
    if not callable(factory):
        raise FxRebirthError(f"factory {spec!r} is a {type(factory).__name__}, not a function that builds a model")
    try:
        return factory(**classes)
    except TypeError as exc:
        if classes and "num_classes" in str(exc):
            raise FxRebirthError(f"--num-classes: factory {spec!r} takes no num_classes argument; size its "
                                 "classifier in the factory and drop --num-classes") from None
        raise FxRebirthError(f"factory {spec!r} raised TypeError: {first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line
        raise FxRebirthError(f"factory {spec!r} raised {type(exc).__name__}: {first_line(exc)}") from None


def _timm_has(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def _timm_model(name: str, classes: dict) -> nn.Module:
    """timm's model ``name``, untrained (nothing is downloaded), or a one-line error."""
    try:
        import timm
    except ImportError:
        raise FxRebirthError(f"timm:{name}: timm is not installed (pip install timm)") from None
    if not timm.is_model(name):
        raise FxRebirthError(f"timm:{name}: timm has no model of that name (timm.list_models() lists them)")
    try:
        return timm.create_model(name, pretrained=False, **classes)
    except Exception as exc:  # noqa: BLE001 - a third-party builder: report it in one line
        raise FxRebirthError(f"timm:{name}: timm cannot build it ({type(exc).__name__}: {first_line(exc)})") from None


def _read_state(path: str) -> dict:
    """The ``state_dict`` in the file ``path`` (``weights_only=True``; fxrebirth's own checkpoints, which hold it
    under ``"model"``, too), each failure a one-line error naming the file."""
    if not os.path.exists(path):
        raise FxRebirthError(f"--weights {path}: no such file")
    if os.path.isdir(path):
        raise FxRebirthError(f"--weights {path} is a directory; give the state_dict file (e.g. model.pt)")
    if not os.access(path, os.R_OK):
        raise FxRebirthError(f"--weights {path}: the file is not readable (permission denied)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise FxRebirthError(f"--weights {path}: cannot read it ({first_line(exc, 200)})") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        raise FxRebirthError(f"--weights {path}: not a readable state_dict ({first_line(exc, 200)})") from None
    for key in ("model", "state_dict"):  # fxrebirth's own checkpoints (the cached teacher); training checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise FxRebirthError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str, name: str = "the model") -> None:
    """Load the ``state_dict`` file ``path`` into ``model``, each failure a one-line error naming the file."""
    _fit(model, _read_state(path), f"--weights {path} does not fit {name}")


def state_mismatch(model: nn.Module, state: dict, shown: int = 3) -> str:
    """How ``state`` differs from ``model``'s own state_dict, in one line: the keys missing from it, those it
    has that the model lacks, and the shapes that differ (the first ``shown`` of each, with their count);
    empty when it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {_shape(state[k])} vs the model's {_shape(own[k])}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    said = []
    for items, what in ((missing, "missing from the weights"), (unexpected, "in the weights but not the model"),
                        (shapes, "with another shape")):
        if items:
            more = f", ... ({len(items) - shown} more)" if len(items) > shown else ""
            said.append(f"{len(items)} key(s) {what}: {', '.join(items[:shown])}{more}")
    return "; ".join(said)


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(str(n) for n in tensor.shape) + "]"


def _fit(model: nn.Module, state: dict, say: str) -> None:
    """``model.load_state_dict(state)``; a state that does not fit is a one-line error ``say: <how it differs>``."""
    differ = state_mismatch(model, state)
    if differ:
        raise FxRebirthError(f"{say}: {differ}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise FxRebirthError(f"{say}: {first_line(exc)}") from None


def _classes_of(model: nn.Module, state: dict) -> int | None:
    """The class count ``state`` was trained for, when it differs from ``model``'s only in the rows of the last
    linear (or 1x1 convolution) layer: the one thing a user changes in a standard architecture."""
    own = model.state_dict()
    differ = sorted(k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape))
    last = [_last_layer(model)] if _last_layer(model) else []
    if not last or set(differ) - {f"{last[0]}.weight", f"{last[0]}.bias"} or not differ:
        return None
    weight = state.get(f"{last[0]}.weight")
    if weight is None or tuple(weight.shape[1:]) != tuple(own[f"{last[0]}.weight"].shape[1:]):
        return None
    return int(weight.shape[0])


def _last_layer(model: nn.Module) -> str | None:
    """The name of ``model``'s last linear or convolution layer (registration order): its classifier."""
    names = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return names[-1] if names else None


def load_trained(spec: str, path: str | None, num_classes: int | None = None) -> nn.Module:
    """``load_model(spec)`` with the weights of ``path`` (None: untrained), in eval mode. The class count is
    ``num_classes`` when given (``--num-classes``; weights trained for another count are a one-line error naming
    both), else read from the weights: a state_dict that differs from the architecture only in the rows of its last
    layer (a ResNet-18 trained on 10 classes) builds the architecture with that many (the paper's networks,
    torchvision's and timm's). Anything else that does not fit is a one-line error naming the keys and shapes."""
    if path is None:
        return load_model(spec, num_classes).eval()
    state = _read_state(path)
    named = spec in PAPER_MODELS or ":" not in spec or spec.startswith("timm:")
    model = load_model(spec, num_classes)
    last = _last_layer(model)
    found = _classes_of(model, state) if named else None
    if num_classes is not None and last and f"{last}.weight" in state:
        rows = int(state[f"{last}.weight"].shape[0])
        if rows != num_classes:
            raise FxRebirthError(f"--num-classes {num_classes}, but --weights {path} was trained for {rows} classes "
                                 f"({last}.weight has {rows} rows): give --num-classes {rows} or drop it")
    elif found is not None:
        model = load_model(spec, num_classes=found)
    _fit(model, state, f"--weights {path} does not fit {spec}")
    return model.eval()
