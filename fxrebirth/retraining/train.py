"""Training plumbing shared by the teacher and the retraining engine: batches, evaluation, progress,
checkpoints and torch.distributed.

Progress goes to a callback (``progress(event)``, a :class:`Progress`); library code never prints. The CLI
turns events into progress bars. Checkpoints are written atomically (a temporary file, then ``os.replace``)
and hold tensors and plain data only, so they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from fxrebirth.errors import FxRebirthError
from fxrebirth.retraining.augment import Augment, MixedLabels
from fxrebirth.retraining.data import DataError, accuracy_interval

__all__ = ["Progress", "ProgressFn", "batches", "evaluate", "Evaluation", "save_checkpoint", "load_checkpoint",
           "world", "fingerprint", "Meter", "batch_count", "pass_sizes", "check_labels",
           "kd_loss", "feature_loss", "all_reduce_grads", "resolve_device", "Arithmetic"]

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """One progress event: ``stage`` (e.g. ``"teacher"``, ``"kd"``), ``done`` of ``total`` units
    (``unit``: ``"img"`` or ``"step"``), the latest loss, and the estimated seconds left in the stage."""

    stage: str
    done: int
    total: int
    unit: str = "img"
    loss: float | None = None
    eta_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]


class Meter:
    """Emits :class:`Progress` for a stage of ``total`` units, with an ETA from the elapsed rate."""

    def __init__(self, progress: ProgressFn | None, stage: str, total: int, unit: str = "img") -> None:
        self.progress, self.stage, self.total, self.unit = progress, stage, total, unit
        self.start, self.done = time.perf_counter(), 0

    def update(self, n: int, loss: float | None = None, **info: Any) -> None:
        self.done += n
        if self.progress is None or not world()[0] == 0:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        self.progress(Progress(self.stage, min(self.done, self.total), self.total, self.unit, loss, eta, info))


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of torch.distributed, ``(0, 1)`` when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means here: ``auto`` is CUDA when present, else the CPU; under torchrun (more than
    one rank) ``cuda`` and ``auto`` take ``cuda:$LOCAL_RANK``. Asking for CUDA without it is an error."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = "cuda" if cuda else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not cuda:
            raise FxRebirthError(f"device={name!r}, but this PyTorch sees no CUDA device: use device='cpu' or 'auto'")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world()[1] > 1 else
                                  torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


class Arithmetic:
    """The precision of a gradient step: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast and a gradient
    scaler, CUDA only), on ``device``. ``with arithmetic: loss = ...`` then :meth:`step`."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.check(precision, device)
        self.precision, self.device = precision, device
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self._autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else None
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    @staticmethod
    def check(precision: str, device: torch.device) -> None:
        """Refuse a precision ``device`` cannot train in (fp16 needs CUDA)."""
        if precision == "fp16" and device.type != "cuda":
            raise FxRebirthError("precision='fp16' needs a CUDA device; on the CPU use precision='bf16'")

    def __enter__(self) -> None:
        if self._autocast is not None:
            self._autocast.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._autocast is not None:
            self._autocast.__exit__(*exc)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, reduce: Callable[[], None]) -> None:
        """Backward, ``reduce()`` (the gradients' all-reduce), then the optimiser step (scaled under fp16)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            reduce()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        reduce()
        self.scaler.step(optimizer)
        self.scaler.update()


def _tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    fast = getattr(data, "tensors", None)
    return fast() if callable(fast) else None


class _Indexed(Dataset):
    """``data``'s items with their index: ``(x, y, i)`` (the order a loader draws is unchanged)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.data[i]
        return x, y, i


def pass_sizes(images: int, batch_size: int) -> list[int]:
    """The batch sizes of one pass over ``images`` images: full batches, then the rest, except that a rest of
    ONE image joins the batch before it (a training-mode BatchNorm cannot normalise a lone image whose
    feature map is 1x1: "Expected more than 1 value per channel")."""
    sizes = [batch_size] * (images // batch_size) + ([images % batch_size] if images % batch_size else [])
    if batch_size > 1 and len(sizes) > 1 and sizes[-1] == 1:
        sizes = sizes[:-2] + [sizes[-2] + 1]
    return sizes


def check_labels(y: Any, index: Any, classes: int | None, name: str) -> None:
    """Raise :class:`~fxrebirth.retraining.data.DataError` naming the item, its label and the class count when an
    integer label of ``y`` (items ``index`` of the dataset ``name``) is outside ``0 .. classes - 1``."""
    if classes is None or not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex():
        return
    bad = (y < 0) | (y >= classes)
    if bool(bad.any()):
        at = int(bad.nonzero()[0, 0])
        raise DataError(f"{name}: item {int(index[at])} has label {int(y[at])}, out of range for a model with {classes} "
                        f"classes (labels 0 to {classes - 1}); fix the labels or the model's number of outputs")


def _rows(loader_iter: Iterator, n: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The next ``n`` rows of an indexed loader (one loader batch, or two where a lone last image joined)."""
    xs, ys, ids = [], [], []
    while sum(len(i) for i in ids) < n:
        x, y, i = next(loader_iter)
        xs.append(x)
        ys.append(torch.as_tensor(y))
        ids.append(torch.as_tensor(i))
    x, y, i = (torch.cat(v) if len(v) > 1 else v[0] for v in (xs, ys, ids))
    return x[:n], y[:n], i[:n]


def batches(data: Dataset, batch_size: int, *, seed: int | None = None, images: int | None = None,
            augment: bool | Augment = False, device: torch.device | str | None = None,
            classes: int | None = None, name: str = "data") -> Iterator[tuple[Any, Any]]:
    """``(x, y)`` batches: shuffled with ``seed`` (None: in order), ``images`` in all (default one pass; more
    than the dataset wraps around with a new permutation), augmented by ``augment`` (an
    :class:`~fxrebirth.retraining.augment.Augment`; ``True``: random horizontal flips), moved to ``device`` when
    given (the order and augmentation do not depend on it; under mixup ``y`` is a ``MixedLabels``). A pass
    never ends on a batch of one image (:func:`pass_sizes`). With ``classes``, every label is checked when its
    batch is drawn (:func:`check_labels`: a clear error naming the item, never an IndexError in the loss).

    Under torch.distributed each rank gets its share of every global batch (rows ``rank::world``), so a
    data-parallel run sees the same global batches as a single process."""
    rank, size = world()
    augment = Augment(("flip",)) if augment is True else augment
    total = len(data) if images is None else images
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    fast = _tensors(data)
    loader_iter: Iterator | None = None
    done = 0
    while done < total:
        if fast is not None:
            order = torch.randperm(len(data), generator=generator) if generator is not None else torch.arange(len(data))
        else:
            loader_iter = iter(DataLoader(_Indexed(data), batch_size=batch_size, shuffle=generator is not None,
                                          generator=generator, num_workers=0))
        start = 0
        for n in pass_sizes(min(len(data), total - done), batch_size):
            if fast is not None:
                idx = order[start:start + n]
                x, y = fast[0][idx], fast[1][idx]
            else:
                x, y, idx = _rows(loader_iter, n)
            check_labels(y, idx, classes, name)
            if augment:
                x, y = augment(x, y, generator)
            done, start = done + n, start + n
            x, y = x[rank::size], y[rank::size]
            yield (x, y) if device is None else (x.to(device, non_blocking=True), y.to(device, non_blocking=True))


def batch_count(length: int, batch_size: int, images: int | None = None) -> int:
    """How many batches :func:`batches` yields (a pass over the data ends with a short batch, never of one
    image where the batch size is larger)."""
    images = length if images is None else images
    full, rest = divmod(images, length)
    return full * len(pass_sizes(length, batch_size)) + len(pass_sizes(rest, batch_size))


@dataclass
class Evaluation:
    """Accuracy on a labelled set: top-1 (with its 95% Wilson interval), top-5 when there are more than 10
    classes, and, with a reference model, the agreement of the top-1 predictions."""

    images: int
    top1: float
    top1_interval: tuple[float, float]
    top5: float | None = None
    agreement: float | None = None
    predictions: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "top1": self.top1, "top1_interval": list(self.top1_interval),
                "top5": self.top5, "agreement": self.agreement}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 500, reference: torch.Tensor | None = None,
             device: torch.device | str = "cpu", name: str = "evaluation data") -> Evaluation:
    """Evaluate ``model`` (in eval mode) on every item of ``data``; ``reference``: another model's top-1
    predictions on the same data, for the agreement. A label outside the model's outputs is a
    :class:`~fxrebirth.retraining.data.DataError` naming the item of ``data`` (``name``)."""
    was_training = model.training
    model.eval()
    preds, top5_hits, labels = [], 0, []
    for x, y in batches(data, batch_size, device=device):
        logits = model(x).float().cpu()
        y = y.cpu()
        seen = sum(len(t) for t in labels)  # in order: the items' indices (a bad label would count as wrong)
        check_labels(y, range(seen, seen + len(y)), logits.shape[1] if logits.dim() == 2 else None, name)
        preds.append(logits.argmax(1))
        labels.append(y)
        if logits.shape[1] > 10:
            top5_hits += int((logits.topk(5, 1).indices == y[:, None]).any(1).sum())
    model.train(was_training)
    pred, label = torch.cat(preds), torch.cat(labels)
    correct = int((pred == label).sum())
    n = label.numel()
    agreement = float((pred == reference).float().mean()) if reference is not None else None
    return Evaluation(n, correct / n, accuracy_interval(correct, n), top5_hits / n if len(preds) and
                      logits.shape[1] > 10 else None, agreement, pred)


def paired_difference(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """95% interval of ``acc(a) - acc(b)`` for two models' predictions on the same images (paired: the
    variance comes only from the images where exactly one of them is right)."""
    da = (a == labels).double() - (b == labels).double()
    n = da.numel()
    mean = float(da.mean())
    half = z * float(da.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return (mean - half, mean + half)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of plain data and tensors (to tell whether a checkpoint belongs to this job)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict) and part and all(isinstance(v, torch.Tensor) for v in part.values()):
            for key in sorted(part):
                h.update(key.encode())
                h.update(part[key].detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain data) atomically: a crash leaves the previous checkpoint intact."""
    if world()[0] != 0:
        return
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (loaded with ``weights_only=True``), or None when there is none."""
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error relative to the teacher feature's mean square (over the global batch, so that a
    data-parallel run optimises the same loss as one process)."""
    scale = teacher.pow(2).mean().detach()
    if world()[1] > 1:
        dist.all_reduce(scale)
        scale = scale / world()[1]
    return F.mse_loss(student, teacher) / scale.clamp(min=1e-12)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | MixedLabels,
            temperature: float, kd_weight: float) -> torch.Tensor:
    """``kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - kd_weight) * CE(student, labels)``
    (Hinton et al., 2015: the T^2 keeps the soft term's gradients on the scale of the hard term's); mixup's
    labels give their mixed cross-entropy."""
    loss = torch.zeros((), dtype=student.dtype)
    if kd_weight > 0:
        kl = F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                      reduction="batchmean", log_target=True)
        loss = loss + kd_weight * temperature ** 2 * kl
    if kd_weight < 1:
        hard = labels.cross_entropy(student) if isinstance(labels, MixedLabels) else F.cross_entropy(student, labels)
        loss = loss + (1 - kd_weight) * hard
    return loss


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks (what DDP does, for modules outside a DDP wrapper)."""
    size = world()[1]
    if size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(size)
