"""The ``imagefolder`` dataset: ``data.root`` holding ``train/<class>/*`` and
``test/<class>/*``, decoded once into memory (cached as safetensors under
``root/.exitnas-cache``) or streamed per batch (:mod:`exitnas.stream`, ``data.loader``).
Both read the same files in the same order (:func:`list_folder`) and open only the image
formats of :data:`exitnas.stream.FORMATS`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data import DATASETS, Loaded, TensorSet
from .errors import DataError

if TYPE_CHECKING:
    from .space import Space


def list_folder(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Every file of ``folder/<class>/`` as ``<class>/<name>`` (classes in the given order,
    names sorted) and its label: the one order both kinds of set index."""
    names, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(folder / name) if e.is_file())
        names += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
    if not names:
        raise DataError(f"{folder}: no images found")
    return names, labels


def _decode_folder(folder: Path, files: list[str], labels: list[int], channels: int,
                   size: int) -> TensorSet:
    from PIL import Image

    from .stream import FORMATS

    images = []
    for f in files:
        with Image.open(folder / f, formats=FORMATS) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
        images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    return TensorSet(torch.from_numpy(np.ascontiguousarray(np.stack(images))),
                     torch.tensor(labels, dtype=torch.int64))


def use_stream(space: Space, images: int) -> bool:
    """Whether a dataset that can stream should, holding ``images`` images (train + test):
    ``data.loader: stream``, or ``auto`` when their decoded size (images x channels x size^2
    bytes) is above ``data.stream_threshold``."""
    cfg = space.data
    if cfg.loader != "auto":
        return cfg.loader == "stream"
    return images * space.input.channels * space.input.size ** 2 > cfg.stream_threshold


@DATASETS.register("imagefolder")
def imagefolder(space: Space) -> Loaded:
    """data.root holding train/ and test/ class folders.

    ``root/train/<class>/*`` and ``root/test/<class>/*``; streamed per batch (``data.loader``),
    or decoded once into ``root/.exitnas-cache``."""
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
    listed = {}
    if space.data.loader != "memory":  # memory with a cache never needs the listing
        listed = {split: list_folder(root / split, classes) for split in ("train", "test")}
        if use_stream(space, sum(len(v[0]) for v in listed.values())):
            from .stream import FolderSet

            return (*(FolderSet.of(root / split, *listed[split], channels=c, size=s,
                                   num_workers=space.data.num_workers)
                      for split in ("train", "test")), tuple(classes))
    sets = []
    for split in ("train", "test"):
        cache = root / ".exitnas-cache" / f"{split}-c{c}-s{s}.safetensors"
        try:
            t = load_file(str(cache))
            ts = TensorSet(t["images"], t["labels"])
        except Exception:  # missing or unreadable cache: decode again
            files, labels = listed.get(split) or list_folder(root / split, classes)
            ts = _decode_folder(root / split, files, labels, c, s)
            try:
                with atomic_path(cache) as tmp:
                    save_file({"images": ts.images.contiguous(), "labels": ts.labels}, str(tmp))
            except OSError:
                pass  # read-only dataset folder: decode each time
        sets.append(ts)
    return sets[0], sets[1], tuple(classes)
