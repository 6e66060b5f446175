"""Datasets and splits: bundled digits, synthetic, ImageFolder; val held out and never augmented."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from exitnas.data import augment, batches, load_splits
from exitnas.errors import DataError


def test_digits_splits_are_disjoint_and_fixed(quick_space):
    a = load_splits(quick_space)
    b = load_splits(quick_space)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.val) == round((len(a.train) + len(a.val)) * quick_space.data.val_fraction)
    assert torch.equal(a.val.images, b.val.images)  # same seed, same split
    rows = lambda s: {bytes(x.numpy()) for x in s.images}  # noqa: E731
    assert not rows(a.val) & rows(a.test)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    assert a.classes == tuple(str(i) for i in range(10))


def test_val_batches_are_never_augmented(quick_space):
    s = load_splits(quick_space.with_overrides({"data.augment": True}))
    first = next(batches(s.val, batch_size=32, mean=s.mean, std=s.std))[0]
    again = next(batches(s.val, batch_size=32, mean=s.mean, std=s.std))[0]
    assert torch.equal(first, again)
    raw = (s.val.images[:32].float() / 255 - s.mean[0]) / s.std[0]
    assert torch.allclose(first, raw)


def test_shuffled_order_depends_only_on_seed(tiny_space):
    s = load_splits(tiny_space)
    run = lambda seed: [y.tolist() for _, y in batches(  # noqa: E731
        s.train, batch_size=16, mean=s.mean, std=s.std, shuffle=True, augment_images=True, seed=seed)]
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_distributed_shards_are_disjoint_and_equal(tiny_space):
    s = load_splits(tiny_space)
    kw = dict(batch_size=8, mean=s.mean, std=s.std, shuffle=True, seed=1, world=2)
    r0 = torch.cat([y for _, y in batches(s.train, rank=0, **kw)])
    r1 = torch.cat([y for _, y in batches(s.train, rank=1, **kw)])
    assert len(r0) == len(r1) == len(s.train) // 2


def test_augment_crops_and_flips_real_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).reshape(2, 1, 8, 8)
    out = augment(x, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every non-zero output pixel comes from its own image
    for i in range(2):
        assert set(out[i][out[i] > 0].tolist()) <= set(x[i].flatten().tolist())


def _write_folder(root, classes=("cat", "dog"), per_class=6, size=8):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_imagefolder_reads_and_caches(tmp_path, tiny_space):
    _write_folder(tmp_path)
    space = tiny_space.with_overrides({"num_classes": 2, "data.dataset": "imagefolder",
                                       "data.root": str(tmp_path), "data.val_fraction": 0.25})
    s = load_splits(space)
    assert s.classes == ("cat", "dog")
    assert len(s.train) + len(s.val) == 12 and len(s.test) == 12
    assert list((tmp_path / ".exitnas-cache").glob("*.safetensors"))
    again = load_splits(space)  # from the decoded cache
    assert torch.equal(s.train.images, again.train.images)
    img = np.array(Image.open(tmp_path / "test" / "cat" / "0.png"))
    assert torch.equal(s.test.images[0], torch.from_numpy(img).permute(2, 0, 1))


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "missing folder train/"),
    (lambda root: (root / "train").mkdir() or (root / "test").mkdir(), "train/ has no class folders"),
    (lambda root: [(root / s / "cat").mkdir(parents=True) for s in ("train", "test")]
     and [(root / s / "dog").mkdir(parents=True) for s in ("train", "test")], "no images found"),
])
def test_imagefolder_errors_name_the_problem(tmp_path, tiny_space, make, message):
    make(tmp_path)
    space = tiny_space.with_overrides({"num_classes": 2, "data.dataset": "imagefolder",
                                       "data.root": str(tmp_path)})
    with pytest.raises(DataError, match=message):
        load_splits(space)


def test_wrong_input_shape_is_reported(quick_space):
    with pytest.raises(DataError, match=r"images are \[1, 8, 8\] but input is \[3, 8, 8\]"):
        load_splits(quick_space.with_overrides({"input.channels": 3}))


@pytest.mark.slow
def test_cifar10_jpeg_imagefolder(cifar10_root, tiny_space):
    space = tiny_space.with_overrides({
        "num_classes": 10, "input.size": 32, "data.dataset": "imagefolder",
        "data.root": str(cifar10_root)})
    s = load_splits(space)
    assert len(s.train) + len(s.val) == 50_000 and len(s.test) == 10_000
    assert s.classes[0] == "airplane"
