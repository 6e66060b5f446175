"""Datasets split into train / val / test, held in memory or streamed from image files.

Datasets are functions in the :data:`DATASETS` registry, named by ``data.dataset``: each takes
the :class:`~exitnas.space.Space` and returns ``(train, test, classes)`` as :class:`ImageSet`
(a :class:`TensorSet`: uint8 images ``[N, C, H, W]`` and int64 labels in memory; or a
:class:`~exitnas.stream.FolderSet`: image files read per batch) and class names;
:func:`load_splits` checks the shapes, holds val out of train and normalises. Add your own with
``@DATASETS.register("name")`` (it may return either kind; :func:`use_stream` says which
``data.loader`` asks for). Built in: ``digits`` (scikit-learn's bundled 8x8 digits: no
download), ``synthetic`` (class templates plus noise, for tests), ``cifar10`` / ``cifar100``
(torchvision, ``download`` flag), ``imagefolder`` (``root/train/<class>/*`` and
``root/test/<class>/*``). Only ``imagefolder`` streams; in memory its decoded images are cached
as safetensors under ``root/.exitnas-cache`` so a second run skips JPEG decoding.

Val is held out of train with ``split_seed`` (the same indices for either kind) and is never
augmented. Every consumer reads a set through :func:`batches` (``set.batches(...)``): in
memory, random crop with zero padding of size/8 and a horizontal flip on train, which keeps two
CPU cores busy without worker processes; streamed, torchvision's RandomResizedCrop + flip on
train and Resize + CenterCrop for evaluation, in ``data.num_workers`` DataLoader workers.
Either way the order and augmentation of each epoch depend only on ``(seed, epoch)``, so a
resumed run sees the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator

import numpy as np
import torch

from .errors import DataError
from .registry import Registry

if TYPE_CHECKING:
    from .space import Space


Batch = tuple[torch.Tensor, torch.Tensor]  # normalised float32 [B, C, H, W], int64 labels [B]


class ImageSet:
    """One split's images: ``len``, ``labels`` (int64 [N]), ``shape`` ((C, H, W) of a batch
    image), ``subset(index)``, ``stats()`` and ``batches(...)``; every kind (in memory,
    streamed) implements them, so no consumer asks which kind it holds. ``streams`` is True
    for a set read from files per batch."""

    streams: ClassVar[bool] = False
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def view(self) -> dict:
        """How an image file becomes an evaluation input of this set (the export's
        ``input.view``, which the runtime applies): ``{"resize": "square"}``, every image
        resized to size x size (Pillow, bilinear), as the in-memory decoders do."""
        return {"resize": "square"}

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def subset(self, index: torch.Tensor) -> "ImageSet":
        raise NotImplementedError

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the pixels scaled to [0, 1] (``data.mean`` / ``std``
        when the space leaves them unset)."""
        raise NotImplementedError

    def batches(self, *, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                shuffle: bool = False, augment_images: bool = False, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """See :func:`batches`."""
        raise NotImplementedError


def epoch_plan(n: int, *, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
               rank: int, world: int) -> tuple[torch.Generator, list[torch.Tensor]]:
    """The index batches of one pass over ``n`` samples and the generator that drew them
    (the set's augmentation draws from it next). With ``shuffle`` the order depends on
    ``seed`` only; ``rank``/``world`` shard it (every rank gets the same number of batches)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    if world > 1:
        per = n // world
        order = order[rank * per:(rank + 1) * per]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    plan = []
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) == 0:
            break
        plan.append(idx)
    return g, plan


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (floored at 1e-3) of images [N, C, H, W] scaled to [0, 1]."""
    return (tuple(x.mean(dim=(0, 2, 3)).tolist()),
            tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()))


@dataclass(frozen=True)
class TensorSet(ImageSet):
    """Decoded images in memory."""

    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor  # [N] int64

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, index: torch.Tensor) -> "TensorSet":
        return TensorSet(self.images[index], self.labels[index])

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return channel_stats(self.images.float() / 255)

    def batches(self, *, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                shuffle: bool = False, augment_images: bool = False, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Random crop (zero padding of size/8) + horizontal flip with ``augment_images``."""
        g, plan = epoch_plan(len(self), batch_size=batch_size, shuffle=shuffle, seed=seed,
                             drop_last=drop_last, rank=rank, world=world)
        for idx in plan:
            images = self.images[idx]
            if augment_images:
                images = augment(images, g)
            yield normalize(images, mean, std), self.labels[idx]


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


Loaded = tuple[ImageSet, ImageSet, tuple[str, ...]]  # (train, test, class names)
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


def _check_kind(cfg, name: str, part: ImageSet) -> None:
    if cfg.loader == "stream" and not part.streams:
        raise DataError(f"data.loader 'stream': dataset {cfg.dataset!r} loads its {name} split "
                        "into memory (only a dataset that returns a streaming set, such as "
                        "imagefolder, can stream); use data.loader auto or memory")
    if cfg.loader == "memory" and part.streams:
        raise DataError(f"data.loader 'memory': dataset {cfg.dataset!r} streams its {name} "
                        "split; use data.loader auto or stream")


def load_splits(space: Space) -> Splits:
    """Load the space's dataset (``DATASETS[data.dataset]``) and split it; checks shapes
    against ``space.input``."""
    cfg = space.data
    train, test, classes = DATASETS.get(cfg.dataset)(space)
    _check_kind(cfg, "train", train)
    _check_kind(cfg, "test", test)
    shape = tuple(train.shape)
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
    known = space.family.weights_meta(space.backbone)  # the normalisation weights were made with
    mean, std = cfg.mean or known.get("mean"), cfg.std or known.get("std")
    if mean is None or std is None:
        measured = train.stats()
        mean, std = mean or measured[0], std or measured[1]
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


def batches(data: ImageSet, *, batch_size: int, mean: tuple[float, ...],
            std: tuple[float, ...], shuffle: bool = False, augment_images: bool = False,
            seed: int = 0, drop_last: bool = False, rank: int = 0, world: int = 1
            ) -> Iterator[Batch]:
    """Yield normalised float batches of ``data`` (``data.batches``: each kind of set makes its
    own). With ``shuffle`` the order depends on ``seed`` only; ``augment_images`` is the
    training augmentation (without it, the evaluation view); ``rank``/``world`` shard each
    epoch for distributed training (every rank gets the same number of batches)."""
    return data.batches(batch_size=batch_size, mean=mean, std=std, shuffle=shuffle,
                        augment_images=augment_images, seed=seed, drop_last=drop_last,
                        rank=rank, world=world)


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


from . import imagefolder as _imagefolder  # noqa: E402,F401 (registers "imagefolder")
