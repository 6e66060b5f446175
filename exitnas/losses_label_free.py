"""``label_free``: exit heads learn by distilling the final exit on unlabelled images.

Online layer caching (Abedi, Ioannou, Jamshidi, Hemmati, "Improving the Performance of
DNN-based Software Services using Automated Layer Caching", arXiv 2209.08625, 2022): a trained
backbone is kept as it is, and the "cache models" at its intermediate layers (exit heads) are
trained online on the incoming, unlabelled requests, with the backbone's own final prediction
as their target (self-distillation), so no labels and no training data are needed. Here, in
the disjoint regime's heads-only phase (phase 3: the backbone, its final head included, gets no
gradient and its BatchNorm stays in eval mode), every step draws a batch from the folder
``data.unlabelled`` instead of the labelled train batch, and each early exit k learns

    KL(softmax(z_final) || softmax(z_k))      (batch mean, nats; z_final detached, T = 1)

averaged over the early exits; the labels are never read. With no early exit there is nothing
to learn. ``temperature`` and ``weight`` are not used (matching the final exit's plain softmax).

**Selected as a loss** (``retrain.loss: label_free`` with ``data.unlabelled: PATH``), refused
in one line under any regime but ``disjoint`` (``retrain`` and ``finetune --regime disjoint``):
what changes is the training signal of a step, which is what a loss is (it is the BYOT
``distill`` loss with the label term gone, on other images), while a regime says which
parameters train in which phase, and label-free training changes none of that; as a loss it
also works unchanged in ``finetune`` and under ``--loss``, where a regime option would double
the regimes and every output path named after them. Joint and mixed would train the backbone
on the heads' distillation loss with no label signal, which the method never does.

**The folder** is read the way the in-memory ``imagefolder`` reads its splits: the files in
``data.unlabelled`` and in its subfolders (class folders are allowed, their names ignored;
names starting with a dot are skipped), sorted, opened by Pillow with the image formats of
:data:`exitnas.stream.FORMATS` only, converted to ``input.channels``, resized to
``input.size`` square (bilinear), decoded once into memory. A file Pillow cannot open stops
the run with a one-line DataError naming it. Step i of epoch e takes the i-th batch of a
permutation of the folder seeded by (``retrain.seed``, e) (drawn again when a pass ends, and
sharded over DDP ranks), with the training augmentation when ``data.augment``, and normalised
with the run's ``data.mean`` / ``std``: a resumed run sees the same batches.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError
from .losses import LOSSES, ExitLoss


def image_files(folder: Path) -> list[Path]:
    """The files of ``folder`` and of its subfolders (one level), sorted, dot-names skipped."""
    files = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files += [Path(entry.path) / e.name for e in sorted(os.scandir(entry.path),
                      key=lambda e: e.name) if e.is_file() and not e.name.startswith(".")]
        elif entry.is_file():
            files.append(Path(entry.path))
    return files


def read_unlabelled(folder: str | Path, *, channels: int, size: int) -> torch.Tensor:
    """Every image of ``folder`` (:func:`image_files`) decoded to uint8 [N, C, size, size]."""
    from PIL import Image

    from .stream import FORMATS

    folder = Path(folder)
    files = image_files(folder)
    if not files:
        raise DataError(f"data.unlabelled {str(folder)!r}: no images found")
    images = []
    for path in files:
        try:
            with Image.open(path, formats=FORMATS) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as err:  # noqa: BLE001 (any decoder failure is the file's fault)
            text = " ".join(str(err).split()) or type(err).__name__
            raise DataError(f"data.unlabelled: {path}: cannot read image ({text})") from None
        images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(images)))


def _generator(*parts) -> torch.Generator:
    """A generator seeded by a 63-bit hash of ``parts`` (ints and strings)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def distill_from_final(logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the early exits of KL(softmax(final, detached) || softmax(exit))."""
    teacher = F.log_softmax(logits[-1].detach(), dim=1)
    terms = [F.kl_div(F.log_softmax(z, dim=1), teacher, reduction="batchmean", log_target=True)
             for z in logits[:-1]]
    return torch.stack(terms).mean() if terms else logits[-1].sum() * 0.0


@LOSSES.register("label_free")
class LabelFree(ExitLoss):
    """Heads distil the final exit on ``data.unlabelled`` batches; see the module docstring."""

    regimes = ("disjoint",)

    def __init__(self, *, temperature: float = 3.0, weight: float = 0.5) -> None:
        super().__init__(temperature=temperature, weight=weight)
        self.images: torch.Tensor | None = None
        self.mean = self.std = ()
        self.augment, self.seed = False, 0
        self._epoch, self._step = -1, 0

    def __call__(self, logits, labels, *, progress=1.0):
        return distill_from_final(logits)

    def check(self, *, regime, space):
        super().check(regime=regime, space=space)
        folder = space.data.unlabelled
        if not folder:
            raise ConfigError(f"{self.name or 'label_free'!r} trains on unlabelled images: set "
                              "data.unlabelled to a folder of them", path="data.unlabelled")
        if not Path(folder).is_dir():
            raise ConfigError(f"{folder!r} is not a folder", path="data.unlabelled")

    def prepare(self, *, space, splits):
        self.images = read_unlabelled(space.data.unlabelled, channels=space.input.channels,
                                      size=space.input.size)
        self.mean, self.std = splits.mean, splits.std
        self.augment, self.seed = space.data.augment, space.retrain.seed

    def batch(self, epoch: int, step: int, size: int, *, rank: int = 0,
              world: int = 1) -> torch.Tensor:
        """Unlabelled batch ``step`` of ``epoch`` (normalised float32 [size, C, H, W])."""
        from .data import augment, normalize

        n = len(self.images)
        start = (step * world + rank) * size
        passes = range(start // n, (start + size - 1) // n + 1)  # a new permutation per pass
        order = torch.cat([torch.randperm(n, generator=_generator(self.seed, epoch, "pass", c))
                           for c in passes])
        offset = start - passes[0] * n
        images = self.images[order[offset:offset + size]]
        if self.augment:
            images = augment(images, _generator(self.seed, epoch, "augment", step, rank))
        return normalize(images, self.mean, self.std)

    def before_step(self, module, x, y, *, epoch, optim):
        if self.images is None:
            raise RuntimeError("label_free: prepare() was not called before training")
        if epoch.index != self._epoch:
            self._epoch, self._step = epoch.index, 0
        dist = torch.distributed
        rank, world = ((dist.get_rank(), dist.get_world_size())
                       if dist.is_available() and dist.is_initialized() else (0, 1))
        xu = self.batch(epoch.index, self._step, len(x), rank=rank, world=world).to(x.device)
        if x.dim() == 4 and not x.is_contiguous():  # the loop made it channels_last
            xu = xu.contiguous(memory_format=torch.channels_last)
        self._step += 1
        return xu, torch.full((len(xu),), -1, dtype=torch.long, device=x.device)
