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

__all__ = ["PAPER_MODELS", "load_model", "load_weights"]


PAPER_MODELS = ("googlenet_lrn", "alexnet_lrn")


def load_model(spec: str) -> nn.Module:
    """A model from the paper's networks (``googlenet_lrn``, ``alexnet_lrn``), a torchvision name
    (``resnet50``) or a factory path (``package.module:factory``).

    torchvision models are built with ``weights=None``: nothing is downloaded.
    """
    if spec in PAPER_MODELS:
        from fxrebirth.paper import models

        return getattr(models, spec)()
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
        model = torchvision.models.get_model(spec, weights=None, **kwargs)
    if not isinstance(model, nn.Module):
        raise FxRebirthError(f"{spec!r} did not produce a torch.nn.Module (got {type(model).__name__})")
    return model


def load_weights(model: nn.Module, path: str, name: str = "the model") -> None:
    """Load the ``state_dict`` file ``path`` into ``model`` (``weights_only=True``; fxrebirth's own
    checkpoints, which hold it under ``"model"``, too), each failure a one-line error naming the file."""
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
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise FxRebirthError(f"--weights {path} does not fit {name}: {first_line(exc)}") from None
