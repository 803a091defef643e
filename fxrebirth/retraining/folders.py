"""The user's images: an ``ImageFolder`` tree in the ImageNet layout (``train/`` and ``val/``) or one folder of
class folders, split reproducibly into training, validation and test images, converted to the channels the
model's first convolution takes and normalised with the user's statistics (or the model's own, or ImageNet's).

Every problem with the data is a one-line :class:`~fxrebirth.retraining.data.DataError` raised by
:func:`user_data`, before any training: a missing folder, class folders without images, a ``val/`` with classes
``train/`` lacks, a file that is not a readable image, a model that takes neither 1 nor 3 channels, a class count
that differs from the model's outputs.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from fxrebirth.errors import first_line, held_stderr
from fxrebirth.retraining.data import DataError

__all__ = ["UserData", "FolderImages", "Part", "user_data", "hold_out", "input_channels", "output_count",
           "check_classes", "model_mean_std", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "CACHE_BYTES"]

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
CACHE_BYTES = 1 << 30
"""Decoded images (uint8, at the training size) of all splits together are kept in memory when they fit this."""

TEST_SHARE = 0.2
"""The test split's share of a single folder (the ImageNet layout's test split is its ``val/``)."""

_GREY = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L"}


@dataclass
class UserData:
    """The user's images, split: ``train`` (training and planning), ``val`` (every decision), ``test`` (evaluated
    once, at the end), each a map-style dataset of ``(float image [C, H, W], int label)`` with ``classes``;
    ``preprocessing`` records what was done (size, mean, std and their source, channel conversions, layout,
    split counts and seed) for the report."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    preprocessing: dict[str, Any] = field(default_factory=dict)


class FolderImages(Dataset):
    """Images ``samples`` (``(path, label)``), each converted to ``channels`` (``L`` or ``RGB``), resized so its
    shorter side is ``size``, centre-cropped to ``size`` x ``size`` and normalised: ``(pixel / 255 - mean) /
    std``. With ``cache`` every image is decoded now (so a bad file fails here) and kept as uint8; otherwise each
    file's header is read now and the image decoded on each access. ``modes`` counts the files' PIL modes."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], *, size: int, channels: int,
                 mean: Sequence[float], std: Sequence[float], cache: bool) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.size, self.channels = size, channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.modes: Counter = Counter()
        self.images: torch.Tensor | None = None
        if cache:
            self.images = torch.empty(len(self.samples), channels, size, size, dtype=torch.uint8)
            for i in range(len(self.samples)):
                self.images[i] = self.read(i, count=True)
        else:
            for path, _ in self.samples:
                self.modes[_header_mode(path)] += 1

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int, count: bool = False) -> torch.Tensor:
        """The image ``index`` as uint8 ``[channels, size, size]``, decoded from its file."""
        from PIL import Image
        from torchvision.transforms import functional as F

        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                if count:
                    self.modes[image.mode] += 1
                image = _convert(image, self.channels)
                image = F.center_crop(F.resize(image, self.size), self.size)
                return F.pil_to_tensor(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"image {path}: cannot be read as an image ({first_line(exc, 160)}); "
                            "remove or replace the file") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index] if self.images is not None else self.read(index)
        return (image.float().div_(255) - self.mean) / self.std, self.targets[index]


def _convert(image: Any, channels: int) -> Any:
    """``image`` as PIL ``L`` (1 channel) or ``RGB`` (3): grey replicated, colour averaged by luminance, alpha
    dropped; 16-bit and float grey scaled to 8 bits by their full range first."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        import numpy as np
        from PIL import Image

        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    return image.convert("L" if channels == 1 else "RGB")


def _header_mode(path: str) -> str:
    """The PIL mode of the image file ``path`` (its header only), or a one-line DataError."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {path}: cannot be read as an image ({first_line(exc, 160)}); "
                        "remove or replace the file") from None


def _class_folders(folder: str) -> dict[str, list[str]]:
    """Class name -> its image files (sorted, at any depth) of ``folder/<class>/...``; one-line errors for a
    folder with no class folders and for class folders with no images."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"image folder {folder}: cannot be listed ({first_line(exc, 160)})") from None
    if not names:
        raise DataError(f"image folder {folder}: no class folders (expected {folder}/<class>/<image>.png)")
    found = {}
    for name in names:
        files = []
        for here, dirs, filenames in os.walk(os.path.join(folder, name), followlinks=True):
            dirs.sort()
            files += [os.path.join(here, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
        found[name] = files
    empty = [name for name, files in found.items() if not files]
    if len(empty) == len(found):
        raise DataError(f"image folder {folder}: no images in any class folder (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS[:4])}, ... files in {folder}/<class>/)")
    if empty:
        raise DataError(f"image folder {folder}: {len(empty)} class folder(s) with no images: "
                        f"{_names(empty)}; remove them or add their images")
    return found


def _names(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _held(labels: Sequence[int], share: float, generator: torch.Generator) -> set[int]:
    """The indices of a seeded ``share`` of each class of ``labels`` (at least one of a class with two or more
    items): the held-out part of a stratified split."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    held: set[int] = set()
    for label in sorted(by_class):
        indices = by_class[label]
        k = max(1, round(len(indices) * share)) if len(indices) >= 2 else 0
        held.update(indices[j] for j in torch.randperm(len(indices), generator=generator)[:k].tolist())
    return held


def _hold_out(samples: list[tuple[str, int]], share: float, generator: torch.Generator
              ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``samples`` (``(path, label)``) split into (kept, held out) by :func:`_held`; both keep their order."""
    held = _held([label for _, label in samples], share, generator)
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


class Part(Subset):
    """The items ``indices`` of ``data``, with ``data``'s ``classes`` and these items' labels as ``targets``."""

    def __init__(self, data: Dataset, indices: Sequence[int], labels: Sequence[int]) -> None:
        super().__init__(data, list(indices))
        self.classes = list(getattr(data, "classes", []) or [])
        self.targets = [int(label) for label in labels]


class _TensorPart(Part):
    """A :class:`Part` of a dataset with the all-at-once ``tensors()`` fast path, which it keeps."""

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.dataset.tensors()
        index = torch.as_tensor(self.indices, dtype=torch.long)
        return images[index], labels[index]


def _labels(data: Dataset) -> list[int]:
    """Every label of ``data``: its ``targets`` or ``labels`` when it has them, else read item by item."""
    labels = getattr(data, "targets", None)
    if labels is None:
        labels = getattr(data, "labels", None)
    if labels is None:
        labels = [data[i][1] for i in range(len(data))]  # type: ignore[arg-type]
    return [int(label) for label in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]


def hold_out(data: Dataset, share: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``data`` split into (kept, held out): a seeded ``share`` of each class held out (at least one item of a
    class with two or more); disjoint, reproducible for a ``seed``, both with ``data``'s ``classes`` (and its
    ``tensors()`` fast path where it has one). The same rule as :func:`user_data`'s validation split."""
    if not 0 < share < 1:
        raise DataError(f"the held-out share must be between 0 and 1 (got {share:g})")
    labels = _labels(data)
    held = _held(labels, share, torch.Generator().manual_seed(seed))
    part = _TensorPart if callable(getattr(data, "tensors", None)) else Part
    kept = [i for i in range(len(labels)) if i not in held]
    if not kept or not held:
        raise DataError(f"{len(labels)} items are too few to hold out a share of {share:g}")
    return (part(data, kept, [labels[i] for i in kept]), part(data, sorted(held), [labels[i] for i in sorted(held)]))


def _splits(root: str, val_share: float, seed: int) -> tuple[list[str], dict[str, list], dict[str, Any]]:
    """The classes, the samples of each split and the layout's record, for either layout under ``root`` (``test/``
    serves as ``val/`` when there is no ``val/``; a lone ``train/`` is the one folder)."""
    generator = torch.Generator().manual_seed(seed)
    train_dir = os.path.join(root, "train")
    val_dir = next((os.path.join(root, n) for n in ("val", "test") if os.path.isdir(os.path.join(root, n))), None)
    if os.path.isdir(train_dir) and val_dir:
        found = _class_folders(train_dir)
        held = _class_folders(val_dir)
        classes = list(found)
        extra = [name for name in held if name not in found]
        if extra:
            raise DataError(f"{val_dir} has {len(extra)} class(es) that {train_dir} lacks: {_names(extra)}; the "
                            "model's classes are train/'s folders: remove them there or add them to train/")
        index = {name: i for i, name in enumerate(classes)}
        pool = [(f, index[name]) for name, files in found.items() for f in files]
        train, val = _hold_out(pool, val_share, generator)
        test = [(f, index[name]) for name, files in held.items() for f in files]
        test_name = os.path.basename(val_dir) + "/"
        layout = {"layout": f"train/ and {test_name} (ImageNet layout)", "test": test_name,
                  "validation": f"a seeded {val_share:g} of train/"}
    else:
        alone = os.path.isdir(train_dir) and [e.name for e in os.scandir(root) if e.is_dir()] == ["train"]
        found = _class_folders(train_dir if alone else root)
        classes = list(found)
        pool = [(f, i) for i, files in enumerate(found.values()) for f in files]
        rest, test = _hold_out(pool, TEST_SHARE, generator)
        train, val = _hold_out(rest, val_share, generator)
        layout = {"layout": "one folder of class folders" + (" (train/)" if alone else ""), "validation": f"a seeded {val_share:g} of the rest",
                  "test": f"a seeded {TEST_SHARE:g} of the folder"}
    splits = {"train": train, "val": val, "test": test}
    short = [name for name, samples in splits.items() if not samples]
    if short:
        raise DataError(f"image folder {root}: too few images to split ({len(pool)} for {len(classes)} classes): "
                        f"the {' and '.join(short)} split(s) would be empty")
    return classes, splits, layout


def model_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The normalisation ``model``'s library records for it (timm's ``pretrained_cfg`` or ``default_cfg``:
    ``mean`` and ``std``), or None when it records none."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
            return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    return None


def _statistics(channels: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                model: nn.Module | None) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """Per-channel mean and std and where they come from: given, the model's config, or ImageNet's."""
    if (mean is None) != (std is None):
        raise DataError(f"give both the mean and the std of the training images (got only the "
                        f"{'mean' if mean is not None else 'std'})")
    source = "given"
    if mean is None:
        recorded = model_mean_std(model) if model is not None else None
        (mean, std), source = (recorded, "the model's config (pretrained_cfg)") if recorded else \
            ((IMAGENET_MEAN, IMAGENET_STD), "ImageNet default")
    values, averaged = [], False
    for name, v in (("mean", tuple(float(x) for x in mean)), ("std", tuple(float(x) for x in std))):
        if len(v) not in (1, channels) and not (source != "given" and channels == 1):
            raise DataError(f"the {name} has {len(v)} values; the model takes {channels}-channel images: give "
                            + ("1 value" if channels == 1 else f"1 value or {channels}"))
        if len(v) != channels and len(v) != 1:  # a 3-channel default for a grey model: their average
            v, averaged = (sum(v) / len(v),), True
        values.append(v * channels if len(v) == 1 else v)
    if any(s <= 0 for s in values[1]):
        raise DataError(f"the std must be positive (got {', '.join(f'{s:g}' for s in values[1])})")
    return values[0], values[1], source + (", averaged over its channels" if averaged else "")


def _conversions(modes: Counter, channels: int) -> list[str]:
    """What converting images of ``modes`` to ``channels`` does, in words (nothing when they already fit)."""
    said = []
    grey = sum(n for m, n in modes.items() if m in _GREY)
    colour = sum(modes.values()) - grey
    if channels == 3 and grey:
        said.append(f"grey images ({grey}) replicated to 3 channels")
    if channels == 1 and colour:
        said.append(f"colour images ({colour}) converted to grey (luminance)")
    alpha = sum(n for m, n in modes.items() if m in ("RGBA", "LA", "PA", "RGBa", "La"))
    if alpha:
        said.append(f"alpha channel dropped ({alpha} images)")
    return said


def input_channels(model: nn.Module, size: int = 32) -> int:
    """The channel count ``model`` takes: its first ``Conv2d``'s ``in_channels`` (in registration order), or,
    for a model without one (an exported program's module), the first of 3, 1, 4 and 2 it runs on."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    for channels in (3, 1, 4, 2):
        try:
            _forward(model, torch.zeros(1, channels, size, size))
            return channels
        except Exception:  # noqa: BLE001 - a probe: the wrong channel count fails
            continue
    raise DataError("cannot tell how many channels the model takes: it has no Conv2d and runs on no 1 to 4 "
                    f"channel {size}x{size} image")


def _forward(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)`` without gradients and without touching ``model`` (a model in training mode runs as an eval
    copy, so batch-norm statistics stay as they are)."""
    probe = copy.deepcopy(model).eval() if model.training else model
    parameter = next(iter(probe.parameters()), None)
    if parameter is not None:
        x = x.to(parameter.device)
    with torch.no_grad(), held_stderr():
        return probe(x)


def output_count(model: nn.Module, size: int, channels: int) -> int | None:
    """How many outputs (classes) ``model`` gives for one ``channels`` x ``size`` x ``size`` image, or None when
    its output is not a ``[1, classes]`` tensor; a model that does not run on it is a one-line DataError."""
    try:
        out = _forward(model, torch.zeros(1, channels, size, size))
    except Exception as exc:  # noqa: BLE001 - the user's model: report it in one line
        raise DataError(f"the model does not run on one {channels}x{size}x{size} image ({type(exc).__name__}: "
                        f"{first_line(exc, 160)}); give an image size it takes") from None
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1:
        return int(out.shape[1])
    return None


def check_classes(model_outputs: int | None, classes: Sequence[str], where: str = "the data") -> None:
    """A one-line DataError unless the model's output count equals the data's class count (None: not known)."""
    if model_outputs is None or model_outputs == len(classes):
        return
    raise DataError(f"{where} has {len(classes)} classes ({_names(list(classes), 4)}) but the model outputs "
                    f"{model_outputs}: give weights trained on these {len(classes)} classes (with --num-classes "
                    f"{len(classes)} if their architecture needs it), or the data the weights were trained on")


def user_data(path: str | os.PathLike, *, size: int, channels: int, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, val_share: float = 0.1, seed: int = 0,
              model: nn.Module | None = None) -> UserData:
    """The user's image folder ``path`` as training, validation and test splits (see the module docstring):
    ``path/train`` + ``path/val`` (validation: a seeded, per-class ``val_share`` of ``train/``; test: ``val/``)
    or ``path/<class>/`` (test: a seeded 20% of each class; validation: ``val_share`` of the rest). Images are
    converted to ``channels`` (1 or 3), resized and centre-cropped to ``size`` and normalised with ``mean`` and
    ``std`` (1 value or one per channel; None: ``model``'s config where its library records one, else ImageNet's).
    With ``model``, its output count must be the number of classes. Raises a one-line DataError otherwise."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist (expected {root}/<class>/<image>.png, or {root}/train/ "
                        "and val/ of class folders)")
    if channels not in (1, 3):
        raise DataError(f"the model takes {channels}-channel images; images convert to 1 (grey) or 3 (RGB) "
                        "channels only: give a model whose first convolution takes 1 or 3")
    if not 0 < val_share < 1:
        raise DataError(f"the validation share must be between 0 and 1 (got {val_share:g})")
    mean, std, source = _statistics(channels, mean, std, model)
    classes, splits, layout = _splits(root, val_share, seed)
    if model is not None:
        check_classes(output_count(model, size, channels), classes, where=f"image folder {root}")
    total = sum(len(samples) for samples in splits.values())
    cache = total * channels * size * size <= CACHE_BYTES
    sets = {name: FolderImages(samples, classes, size=size, channels=channels, mean=mean, std=std, cache=cache)
            for name, samples in splits.items()}
    modes = sum((s.modes for s in sets.values()), Counter())
    preprocessing = {"size": size, "resize": f"shorter side to {size}, centre crop {size}x{size}",
                     "channels": channels, "mean": list(mean), "std": list(std), "mean_std_source": source,
                     "conversions": _conversions(modes, channels), "image_modes": dict(sorted(modes.items())),
                     **layout, "split": {name: len(s) for name, s in sets.items()}, "seed": seed,
                     "val_share": val_share, "cached": cache}
    log.info("%s: %s; %d train, %d validation, %d test images", root, layout["layout"], len(sets["train"]),
             len(sets["val"]), len(sets["test"]))
    return UserData(sets["train"], sets["val"], sets["test"], classes, preprocessing)
