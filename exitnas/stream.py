"""Image files read per batch: the streaming kind of :class:`~exitnas.data.ImageSet`.

    train = FolderSet.of(root / "train", names, labels, channels=3, size=224, num_workers=8)
    for x, y in train.batches(batch_size=256, mean=m, std=s, shuffle=True,
                              augment_images=True, seed=seed * 100_003 + epoch):
        ...

A torch ``DataLoader`` with ``num_workers`` worker processes (0: the calling process) opens
each file (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM only) and applies torchvision's transforms:
``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()`` for training, ``Resize(round(size /
0.875))`` + ``CenterCrop(size)`` otherwise (val, test, BatchNorm calibration). Each sample's
augmentation is seeded from the epoch's generator by its index in the set, so a batch depends
only on ``(seed, epoch)``: not on the number of workers, the rank or what ran before.
An unreadable file stops the pass with a one-line :class:`~exitnas.errors.DataError`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch

from .data import Batch, ImageSet, channel_stats, epoch_plan, normalize
from .errors import DataError

FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # PIL decoders allowed
EVAL_CROP = 0.875   # evaluation: resize the shorter side to size / 0.875, centre-crop size
STATS_IMAGES = 512  # images ``stats`` measures (seeded sample, evaluation view)


class _Files(torch.utils.data.Dataset):
    """Index -> (uint8 [C, size, size], label), or a one-line error text."""

    def __init__(self, folder: str, names: np.ndarray, labels: np.ndarray, *, channels: int,
                 size: int, seeds: np.ndarray | None) -> None:
        from torchvision import transforms as T

        self.folder, self.names, self.labels, self.seeds = folder, names, labels, seeds
        self.mode = "L" if channels == 1 else "RGB"
        self.train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])
        self.eval = T.Compose([T.Resize(round(size / EVAL_CROP)), T.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        path = os.path.join(self.folder, os.fsdecode(self.names[i]))
        try:
            with Image.open(path, formats=FORMATS) as im:
                im = im.convert(self.mode)
                if self.seeds is None:
                    im = self.eval(im)
                else:  # torchvision draws from the global CPU generator: seed it, then restore
                    with torch.random.fork_rng(devices=[]):
                        torch.default_generator.manual_seed(int(self.seeds[i]))
                        im = self.train(im)
                return pil_to_tensor(im), int(self.labels[i])
        except Exception as err:  # noqa: BLE001 (any decoder failure is the file's fault)
            text = " ".join(str(err).split()) or type(err).__name__
            return f"{path}: cannot read image ({text})"


def _collate(items: list, *, mean: tuple[float, ...], std: tuple[float, ...]):
    """Stack and normalise a batch (in the worker); a failed item's text passes through."""
    for item in items:
        if isinstance(item, str):
            return item
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items], dtype=torch.int64)
    return normalize(images, mean, std), labels


@dataclass(frozen=True, eq=False)
class FolderSet(ImageSet):
    """Image files under ``folder`` (``names`` relative to it, as bytes), decoded per batch to
    ``channels`` x ``size`` x ``size``."""

    streams: ClassVar[bool] = True
    folder: str
    names: np.ndarray     # [N] bytes, "<class>/<file>"
    labels: torch.Tensor  # [N] int64
    channels: int
    size: int
    num_workers: int = 0

    @classmethod
    def of(cls, folder: str | Path, names: list[str], labels: list[int], *, channels: int,
           size: int, num_workers: int = 0) -> "FolderSet":
        """From :func:`~exitnas.imagefolder.list_folder`'s listing."""
        return cls(str(folder), np.array([os.fsencode(n) for n in names]),
                   torch.tensor(labels, dtype=torch.int64), channels, size, num_workers)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.size, self.size)

    @property
    def view(self) -> dict:
        """The evaluation view: shorter side to ``round(size / 0.875)``, centre crop."""
        return {"resize": "shorter_side", "shorter": round(self.size / EVAL_CROP),
                "crop": self.size}

    def paths(self) -> list[Path]:
        """The files, in index order."""
        return [Path(self.folder, os.fsdecode(n)) for n in self.names]

    def subset(self, index: torch.Tensor) -> "FolderSet":
        index = torch.as_tensor(index, dtype=torch.int64)
        return FolderSet(self.folder, self.names[index.numpy()], self.labels[index],
                         self.channels, self.size, self.num_workers)

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Measured on ``STATS_IMAGES`` images (a seeded sample) in the evaluation view."""
        zero, one = (0.0,) * self.channels, (1.0,) * self.channels
        xs, n = [], 0
        for x, _ in self.batches(batch_size=64, mean=zero, std=one, shuffle=True, seed=0):
            xs.append(x)
            n += len(x)
            if n >= STATS_IMAGES:
                break
        return channel_stats(torch.cat(xs)[:STATS_IMAGES])

    def batches(self, *, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                shuffle: bool = False, augment_images: bool = False, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """RandomResizedCrop + flip with ``augment_images``, else Resize + CenterCrop."""
        g, plan = epoch_plan(len(self), batch_size=batch_size, shuffle=shuffle, seed=seed,
                             drop_last=drop_last, rank=rank, world=world)
        if not plan:
            return
        seeds = (torch.randint(0, 2**62, (len(self),), generator=g).numpy()
                 if augment_images else None)
        files = _Files(self.folder, self.names, self.labels.numpy(), channels=self.channels,
                       size=self.size, seeds=seeds)
        loader = torch.utils.data.DataLoader(
            files, batch_sampler=[idx.tolist() for idx in plan], num_workers=self.num_workers,
            collate_fn=partial(_collate, mean=tuple(mean), std=tuple(std)))
        for batch in loader:
            if isinstance(batch, str):
                raise DataError(batch)
            yield batch
