"""Models by name for the command line: the paper's networks (``googlenet_lrn``, ``alexnet_lrn``),
torchvision classification models (built without weights: nothing is downloaded) and factory paths
(``package.module:factory``), each failure a one-line :class:`~fxrebirth.errors.FxRebirthError`.
"""

from __future__ import annotations

import importlib
import os
import pickle

import torch
from torch import nn

from fxrebirth.errors import FxRebirthError, first_line

__all__ = ["PAPER_MODELS", "load_model", "load_weights", "load_trained"]


PAPER_MODELS = ("googlenet_lrn", "alexnet_lrn")


def load_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """A model from the paper's networks (``googlenet_lrn``, ``alexnet_lrn``), a torchvision name
    (``resnet50``) or a factory path (``package.module:factory``); ``num_classes`` (the paper's networks and
    torchvision's) sizes its classifier (default: theirs, 1000).

    torchvision models are built with ``weights=None``: nothing is downloaded.
    """
    classes = {} if num_classes is None else {"num_classes": num_classes}
    if spec in PAPER_MODELS:
        from fxrebirth.paper import models

        return getattr(models, spec)(**classes)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise FxRebirthError(f"cannot load factory {spec!r}: {exc}") from None
        if not callable(factory):
            raise FxRebirthError(f"factory {spec!r} is a {type(factory).__name__}, not a function that builds a model")
        try:
            model = factory()
        except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line
            raise FxRebirthError(f"factory {spec!r} raised {type(exc).__name__}: {first_line(exc)}") from None
    else:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if spec not in names:
            raise FxRebirthError(
                f"unknown model {spec!r}: give one of the paper's networks ({', '.join(PAPER_MODELS)}), a "
                f"torchvision classification model name (e.g. {', '.join(names[:4])}, ...) or a factory as "
                "package.module:function"
            )
        kwargs = {"init_weights": False} if spec in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(spec, weights=None, **kwargs, **classes)
    if not isinstance(model, nn.Module):
        raise FxRebirthError(f"{spec!r} did not produce a torch.nn.Module (got {type(model).__name__})")
    return model


def _read_state(path: str) -> dict:
    """The ``state_dict`` in the file ``path`` (``weights_only=True``; fxrebirth's own checkpoints, which hold it
    under ``"model"``, too), each failure a one-line error naming the file."""
    if not os.path.exists(path):
        raise FxRebirthError(f"--weights {path}: no such file")
    if os.path.isdir(path):
        raise FxRebirthError(f"--weights {path} is a directory; give the state_dict file (e.g. model.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise FxRebirthError(f"--weights {path}: cannot read it ({first_line(exc, 200)})") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        raise FxRebirthError(f"--weights {path}: not a readable state_dict ({first_line(exc, 200)})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # fxrebirth's own checkpoints (the cached teacher)
    if not isinstance(state, dict):
        raise FxRebirthError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")
    return state


def load_weights(model: nn.Module, path: str, name: str = "the model") -> None:
    """Load the ``state_dict`` file ``path`` into ``model``, each failure a one-line error naming the file."""
    state = _read_state(path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise FxRebirthError(f"--weights {path} does not fit {name}: {first_line(exc)}") from None


def _classes_of(model: nn.Module, state: dict) -> int | None:
    """The class count ``state`` was trained for, when it differs from ``model``'s only in the rows of the last
    linear (or 1x1 convolution) layer: the one thing a user changes in a standard architecture."""
    own = model.state_dict()
    differ = sorted(k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape))
    last = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]
    if not last or set(differ) - {f"{last[0]}.weight", f"{last[0]}.bias"} or not differ:
        return None
    weight = state.get(f"{last[0]}.weight")
    if weight is None or tuple(weight.shape[1:]) != tuple(own[f"{last[0]}.weight"].shape[1:]):
        return None
    return int(weight.shape[0])


def load_trained(spec: str, path: str | None) -> nn.Module:
    """``load_model(spec)`` with the weights of ``path`` (None: untrained), in eval mode. A state_dict trained for
    another number of classes than the architecture's default (a ResNet-18 trained on 10 classes) builds the
    architecture with that many (the paper's networks and torchvision's); anything else that does not fit is a
    one-line error."""
    if path is None:
        return load_model(spec).eval()
    state = _read_state(path)
    model = load_model(spec)
    classes = _classes_of(model, state) if (spec in PAPER_MODELS or ":" not in spec) else None
    if classes is not None:
        model = load_model(spec, num_classes=classes)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise FxRebirthError(f"--weights {path} does not fit {spec}: {first_line(exc)}") from None
    return model.eval()
