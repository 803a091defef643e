"""Fashion-MNIST as a user has it, and teachers trained the way a user trains them: plain torch, no fxrebirth.

Not collected by the plain test command. Run::

    python -m benchmarks.fashion_mnist_teachers [--arch resnet18 mobilenet_v2 ...] [--epochs 12]

1. **The data**: the four IDX files of Debian's ``dataset-fashion-mnist`` (``apt-get install
   dataset-fashion-mnist``; ``--idx`` elsewhere) written once as an ImageFolder tree in the ImageNet layout,
   ``train/<class>/*.png`` (60,000 grey 28x28 images) and ``val/<class>/*.png`` (the 10,000 test images).
2. **The teachers**: a torchvision architecture with 10 classes, trained from scratch on ``train/`` by the
   script a user would write: the images read back from the tree, replicated to three channels (the
   architecture's first convolution wants RGB), resized to 32x32, normalised with the set's own mean and
   standard deviation, random 4-pixel shifts and horizontal flips, SGD with momentum and Nesterov, a one-cycle
   learning rate, label smoothing 0.1. Nothing of fxrebirth is imported here: the models are the user's, not
   ours. The state_dict is saved after every epoch (with the optimiser, so an interrupted run resumes) and
   ``<arch>.json`` records the test top-1 on ``val/`` and the images trained on.

Everything lands under ``benchmarks/cache/fashion-mnist/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
CACHE = Path(__file__).resolve().parent / "cache" / "fashion-mnist"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
SIZE = 32
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images' pixels (the user's own statistics)


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a numpy array."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_folder(idx: Path = DEBIAN, root: Path = CACHE / "images") -> Path:
    """The IDX files under ``idx`` as ``root/train`` and ``root/val`` ImageFolder trees (once; a finished tree
    has ``root/done``)."""
    from PIL import Image

    if (root / "done").exists():
        return root
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = _idx(next(idx.glob(f"{prefix}-images-idx3-ubyte*")))
        labels = _idx(next(idx.glob(f"{prefix}-labels-idx1-ubyte*")))
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image, "L").save(root / split / CLASSES[label] / f"{i:05d}.png")
    (root / "done").write_text("train: 60000, val: 10000\n")
    return root


def _load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split read back from the tree as a user's script would (torchvision's ImageFolder), resized to SIZE,
    kept as uint8 [N, 1, SIZE, SIZE] in memory (the set is small)."""
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(SIZE), transforms.PILToTensor()])
    folder = torchvision.datasets.ImageFolder(str(root / split), transform=transform,
                                              loader=lambda path: Image.open(path).convert("L"))
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    return images, torch.tensor(folder.targets)


def _batch(images: torch.Tensor, augment: bool, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, 1, H, W] -> normalised float [B, 3, H, W]; with ``augment`` a random shift of up to 4 pixels
    (zero padding) and a horizontal flip."""
    x = (images.float() / 255 - MEAN) / STD
    if augment:
        b = x.shape[0]
        x = F.pad(x, (4, 4, 4, 4), value=-MEAN / STD)
        dx, dy = torch.randint(0, 9, (2, b), generator=generator)
        x = torch.stack([x[i, :, dy[i]:dy[i] + SIZE, dx[i]:dx[i] + SIZE] for i in range(b)])
        flip = torch.rand(b, generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
    return x.expand(-1, 3, -1, -1).contiguous()


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), 500):
            correct += int((model(_batch(images[i:i + 500], False, None)).argmax(1) == labels[i:i + 500]).sum())
    return correct / len(images)


def train_teacher(arch: str, epochs: int, root: Path, batch: int = 128, lr: float = 0.1) -> dict:
    """Train ``arch`` (10 classes) on ``root/train`` for ``epochs``, resuming from its checkpoint; returns its
    record (also written to ``<arch>.json``)."""
    record_path, ckpt_path = CACHE / f"{arch}.json", CACHE / f"{arch}.ckpt"
    if record_path.exists() and json.loads(record_path.read_text())["epochs"] == epochs:
        return json.loads(record_path.read_text())
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    train_x, train_y = _load_split(root, "train")
    test_x, test_y = _load_split(root, "val")
    steps = epochs * (len(train_x) // batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.2)
    start, wall = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, wall = state["epoch"], state["wall_s"]
    for epoch in range(start, epochs):
        began = time.time()
        model.train()
        generator = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(_batch(train_x[idx], True, generator)), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        wall += time.time() - began
        top1 = evaluate(model, test_x, test_y)
        print(f"{arch} epoch {epoch + 1}/{epochs}: test top-1 {top1:.4f} ({wall / 60:.1f} min)", flush=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "epoch": epoch + 1, "wall_s": wall}, ckpt_path)
    torch.save(model.state_dict(), CACHE / f"{arch}.pt")
    record = {"arch": arch, "epochs": epochs, "images": epochs * (len(train_x) // batch) * batch,
              "test_top1": evaluate(model, test_x, test_y), "wall_s": wall, "image_size": SIZE,
              "mean": [MEAN] * 3, "std": [STD] * 3, "weights": str(CACHE / f"{arch}.pt")}
    record_path.write_text(json.dumps(record, indent=1))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--idx", type=Path, default=DEBIAN, help="folder of the four IDX files")
    args = parser.parse_args()
    root = write_folder(args.idx)
    for arch in args.arch:
        print(json.dumps(train_teacher(arch, args.epochs, root)), flush=True)


if __name__ == "__main__":
    main()
