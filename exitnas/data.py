"""Datasets as decoded uint8 tensors in memory, split into train / val / test.

Datasets are functions in the :data:`DATASETS` registry, named by ``data.dataset``: each takes
the :class:`~exitnas.space.Space` and returns ``(train, test, classes)`` as :class:`TensorSet`
(uint8 images ``[N, C, H, W]``, int64 labels) and class names; :func:`load_splits` checks the
shapes, holds val out of train and normalises. Add your own with ``@DATASETS.register("name")``.
Built in: ``digits`` (scikit-learn's bundled 8x8 digits: no download), ``synthetic`` (class
templates plus noise, for tests), ``cifar10`` / ``cifar100`` (torchvision, ``download`` flag),
``imagefolder`` (``root/train/<class>/*`` and ``root/test/<class>/*``). Decoded images are cached
as safetensors under ``root/.exitnas-cache`` so a second run skips JPEG decoding.

Val is held out of train with ``split_seed`` and is never augmented. Batches are made from the
in-memory tensors (random crop with zero padding of size/8 and a horizontal flip on train), which
keeps two CPU cores busy without worker processes; the order of each epoch depends only on
``(seed, epoch)`` so a resumed run sees the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from .errors import DataError
from .registry import Registry

if TYPE_CHECKING:
    from .space import Space


@dataclass(frozen=True)
class TensorSet:
    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor) -> "TensorSet":
        return TensorSet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Splits:
    train: TensorSet
    val: TensorSet
    test: TensorSet
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


Loaded = tuple[TensorSet, TensorSet, tuple[str, ...]]  # (train, test, class names)
DATASETS: Registry[Callable[["Space"], Loaded]] = Registry("dataset")


def dataset_doc() -> str:
    """The ``data.dataset`` reference text: every registered dataset with its docstring's
    first line."""
    parts = [f"{n}: {(DATASETS.get(n).__doc__ or '').strip().splitlines()[0].rstrip('.')}"
             for n in DATASETS.names()]
    return "registered dataset (exitnas.data.DATASETS): " + "; ".join(parts)


@DATASETS.register("digits")
def digits(space: Space) -> Loaded:
    """scikit-learn 8x8 digits, bundled (1 channel, 10 classes).

    The set ships without a test split: a fixed 20 % is held out (seed 1234)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images * 15).astype(np.uint8)).unsqueeze(1)  # 0..16 -> 0..240
    labels = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    n_test = len(labels) // 5  # fixed 20 % test split (the set ships without one)
    full = TensorSet(images, labels)
    return full.subset(perm[n_test:]), full.subset(perm[:n_test]), tuple(str(i) for i in range(10))


@DATASETS.register("synthetic")
def synthetic(space: Space) -> Loaded:
    """class templates plus noise, for tests.

    ``data.synthetic_size`` images, a quarter of them the test split."""
    g = torch.Generator().manual_seed(4321)
    c, s, k = space.input.channels, space.input.size, space.num_classes
    templates = torch.rand(k, c, s, s, generator=g)
    n = space.data.synthetic_size
    labels = torch.arange(n) % k
    noise = torch.rand(n, c, s, s, generator=g)
    images = ((0.6 * templates[labels] + 0.4 * noise) * 255).to(torch.uint8)
    full = TensorSet(images, labels)
    n_test = n // 4
    return full.subset(torch.arange(n_test, n)), full.subset(torch.arange(n_test)), \
        tuple(f"class{i}" for i in range(k))


def _torchvision_cifar(space: Space, name: str, cls) -> Loaded:
    root = space.data.root or "data"
    try:
        train = cls(root, train=True, download=space.data.download)
        test = cls(root, train=False, download=space.data.download)
    except RuntimeError as err:
        raise DataError(f"data.root {root!r}: {name} not found ({err}); set data.download: true "
                        "or point data.root at an extracted copy") from None

    def conv(ds) -> TensorSet:
        return TensorSet(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                         torch.tensor(ds.targets, dtype=torch.int64))

    return conv(train), conv(test), tuple(train.classes)


@DATASETS.register("cifar10")
def cifar10(space: Space) -> Loaded:
    """torchvision CIFAR-10 under data.root.

    ``data.download`` lets torchvision fetch it."""
    import torchvision

    return _torchvision_cifar(space, "cifar10", torchvision.datasets.CIFAR10)


@DATASETS.register("cifar100")
def cifar100(space: Space) -> Loaded:
    """torchvision CIFAR-100 under data.root.

    ``data.download`` lets torchvision fetch it."""
    import torchvision

    return _torchvision_cifar(space, "cifar100", torchvision.datasets.CIFAR100)


def _decode_folder(folder: Path, classes: list[str], channels: int, size: int) -> TensorSet:
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.is_file())
        for f in files:
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
            images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"{folder}: no images found")
    return TensorSet(torch.from_numpy(np.ascontiguousarray(np.stack(images))),
                     torch.tensor(labels, dtype=torch.int64))


@DATASETS.register("imagefolder")
def imagefolder(space: Space) -> Loaded:
    """data.root holding train/ and test/ class folders.

    ``root/train/<class>/*`` and ``root/test/<class>/*``, decoded once into
    ``root/.exitnas-cache``."""
    from safetensors.torch import load_file, save_file

    if not space.data.root:
        raise DataError("data.root: imagefolder needs a folder holding train/ and test/")
    root = Path(space.data.root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"data.root {str(root)!r}: missing folder {split}/ "
                            "(expected root/train/<class>/... and root/test/<class>/...)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"data.root {str(root)!r}: train/ has no class folders")
    if len(classes) != space.num_classes:
        raise DataError(f"data.root {str(root)!r}: {len(classes)} class folders but "
                        f"num_classes is {space.num_classes}")
    from .io import atomic_path

    c, s = space.input.channels, space.input.size
    sets = []
    for split in ("train", "test"):
        cache = root / ".exitnas-cache" / f"{split}-c{c}-s{s}.safetensors"
        try:
            t = load_file(str(cache))
            ts = TensorSet(t["images"], t["labels"])
        except Exception:  # missing or unreadable cache: decode again
            ts = _decode_folder(root / split, classes, c, s)
            try:
                with atomic_path(cache) as tmp:
                    save_file({"images": ts.images.contiguous(), "labels": ts.labels}, str(tmp))
            except OSError:
                pass  # read-only dataset folder: decode each time
        sets.append(ts)
    return sets[0], sets[1], tuple(classes)


def load_splits(space: Space) -> Splits:
    """Load the space's dataset (``DATASETS[data.dataset]``) and split it; checks shapes
    against ``space.input``."""
    cfg = space.data
    train, test, classes = DATASETS.get(cfg.dataset)(space)
    shape = tuple(train.images.shape[1:])
    want = (space.input.channels, space.input.size, space.input.size)
    if shape != want:
        raise DataError(f"data.dataset {cfg.dataset!r}: images are {list(shape)} but input is "
                        f"{list(want)} (input.channels / input.size)")
    if len(classes) != space.num_classes:
        raise DataError(f"data.dataset {cfg.dataset!r} has {len(classes)} classes but "
                        f"num_classes is {space.num_classes}")
    if cfg.train_subset:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(
            cfg.split_seed + 1))[: cfg.train_subset])
    if cfg.test_subset:
        # a seeded random subset: the first N of a class-sorted folder would be one class
        test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(
            cfg.split_seed + 2))[: cfg.test_subset].sort().values)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = max(1, int(round(len(train) * cfg.val_fraction)))
    val, train = train.subset(perm[:n_val]), train.subset(perm[n_val:])
    if len(train) == 0:
        raise DataError(f"data: no training images left after holding out val ({n_val})")
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:
        x = train.images.float() / 255
        mean = mean or tuple(x.mean(dim=(0, 2, 3)).tolist())
        std = std or tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    for name, v in (("data.mean", mean), ("data.std", std)):
        if len(v) != space.input.channels:
            raise DataError(f"{name}: {len(v)} values for {space.input.channels} channels")
    return Splits(train, val, test, classes, tuple(mean), tuple(std))


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32, scaled to [0, 1] and normalised per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding of size/8 and a random horizontal flip, per image."""
    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # [n, h]
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # [n, w]
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def batches(data: TensorSet, *, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
            shuffle: bool = False, augment_images: bool = False, seed: int = 0,
            drop_last: bool = False, rank: int = 0, world: int = 1
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised float batches. With ``shuffle`` the order depends on ``seed`` only;
    ``rank``/``world`` shard each epoch for distributed training (every rank gets the same
    number of batches)."""
    n = len(data)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    if world > 1:
        per = n // world
        order = order[rank * per:(rank + 1) * per]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) == 0:
            break
        images = data.images[idx]
        if augment_images:
            images = augment(images, g)
        yield normalize(images, mean, std), data.labels[idx]


def extract_tarball(tarball: str | Path, dest: str | Path) -> Path:
    """Extract an ImageFolder tarball (``train/<class>/*``, ``test/<class>/*``) into ``dest``
    once, for ``data.dataset: imagefolder``; returns ``dest``. Members that would escape
    ``dest`` are refused (tarfile's ``data`` filter)."""
    import tarfile

    dest, tarball = Path(dest), Path(tarball)
    if not (dest / "test").is_dir():
        if not tarball.is_file():
            raise DataError(f"{tarball}: tarball not found")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(dest, filter="data")
    return dest
