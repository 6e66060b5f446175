"""Datasets and splits: bundled digits, synthetic, ImageFolder; val held out and never augmented."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from exitnas.data import augment, batches, load_splits
from exitnas.errors import DataError


def _samples(ts) -> Counter:
    """Every sample of a split as (image bytes, label), counted."""
    return Counter((bytes(x.numpy()), int(y)) for x, y in zip(ts.images, ts.labels))


def test_digits_splits_are_disjoint_and_fixed(quick_space):
    """train / val / test partition scikit-learn's digits (every image is distinct, so its
    bytes name the sample): nothing lost, nothing in two splits; val is the ``split_seed``
    hold-out of train, the same on every load and moved by no other seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    full = Counter((bytes((img * 15).astype(np.uint8).tobytes()), int(t))
                   for img, t in zip(d.images, d.target))
    assert len(full) == 1797  # distinct: a shared sample would show as a shared key below
    a = load_splits(quick_space)
    train, val, test = _samples(a.train), _samples(a.val), _samples(a.test)
    assert train + val + test == full
    assert not train & val and not train & test and not val & test
    assert len(a.val) == round((len(a.train) + len(a.val)) * quick_space.data.val_fraction)
    b = load_splits(quick_space)  # same seed, same split, same order
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    other_seeds = load_splits(quick_space.with_overrides({"supernet.seed": 5, "search.seed": 5,
                                                          "retrain.seed": 5}))
    assert torch.equal(other_seeds.val.images, a.val.images)
    moved = load_splits(quick_space.with_overrides({"data.split_seed": 1}))
    assert _samples(moved.test) == test  # the test split is fixed by the dataset
    assert _samples(moved.val) != val and _samples(moved.train) + _samples(moved.val) == train + val
    assert not _samples(moved.train) & _samples(moved.val)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    assert a.classes == tuple(str(i) for i in range(10))


def test_val_and_test_are_never_augmented(tiny_space, tmp_path, monkeypatch):
    """With ``data.augment`` on, the real pipeline augments training batches, and only
    those: evaluation (exit accuracies, the val and test caches) and BN calibration never
    call ``augment`` (a spy around the real function records every image it is given)."""
    import exitnas.data
    from exitnas.evaluate import load_or_build_cache
    from exitnas.rundir import RunDir
    from exitnas.supernet import Supernet, calibration_batches
    from exitnas.train import Dist, accuracy, train_batches

    space = tiny_space.with_overrides({"data.augment": True})
    s = load_splits(space)
    seen: list[bytes] = []
    real = exitnas.data.augment

    def spy(images, generator):
        seen.extend(bytes(x.numpy()) for x in images)
        return real(images, generator)

    monkeypatch.setattr(exitnas.data, "augment", spy)
    data, steps = train_batches(s, space, seed=0, epoch=0, dist=Dist(), batch_size=16)
    assert sum(1 for _ in data) == steps
    train = {bytes(x.numpy()) for x in s.train.images}
    assert len(seen) == steps * 16 and set(seen) <= train
    seen.clear()
    net = Supernet(space).eval()
    run = RunDir(tmp_path / "run")
    run.init(space)
    accuracy(net, s.val, s, depths=space.max_depths, batch_size=64, device=torch.device("cpu"))
    for split in ("val", "test"):
        load_or_build_cache(run, net, space.min_depths, s, split=split)
    list(calibration_batches(space, s))
    assert seen == []
    first = next(batches(s.val, batch_size=32, mean=s.mean, std=s.std))[0]
    raw = (s.val.images[:len(first)].float() / 255 - torch.tensor(s.mean).view(1, -1, 1, 1)) / \
        torch.tensor(s.std).view(1, -1, 1, 1)
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


def _transforms(x: torch.Tensor, out: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """For every image, the one (dy, dx, flip) whose crop of the zero-padded input it is."""
    h, w = x.shape[2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    found = []
    for i in range(len(x)):
        hits = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                for flip in (False, True)
                if torch.equal(out[i], (lambda c: c.flip(2) if flip else c)(
                    padded[i, :, dy:dy + h, dx:dx + w]))]
        assert len(hits) == 1, (i, hits)
        found.append(hits[0])
    return found


def test_augment_crops_and_flips_each_image():
    """Every output is a crop (offset 0..2*pad) of its own zero-padded image, flipped or not;
    the crops and flips vary, most images change, and the same seed gives the same result."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=g)  # no zeros
    out = augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    found = _transforms(x, out, pad=2)
    identity = (2, 2, False)
    assert sum(t != identity for t in found) >= 48  # expected 64 * 49/50
    assert len(set(found)) >= 20 and {f for _, _, f in found} == {False, True}
    assert {dy for dy, _, _ in found} == {dx for _, dx, _ in found} == set(range(5))
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(2)))


def test_train_batches_are_augmented_deterministically(tiny_space):
    """``augment_images`` changes the images of the same batches (same order, same labels),
    the same way for the same seed."""
    s = load_splits(tiny_space)
    kw = dict(batch_size=32, mean=s.mean, std=s.std, shuffle=True, seed=3)
    plain = list(batches(s.train, **kw))
    aug = list(batches(s.train, augment_images=True, **kw))
    again = list(batches(s.train, augment_images=True, **kw))
    assert [y.tolist() for _, y in plain] == [y.tolist() for _, y in aug]
    changed = sum(int((a != p).flatten(1).any(1).sum()) for (a, _), (p, _) in zip(aug, plain))
    assert changed >= len(s.train) // 2
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(aug, again))
    other = list(batches(s.train, augment_images=True, **dict(kw, seed=4)))
    assert not torch.equal(other[0][0], aug[0][0])


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


def test_test_subset_is_a_fixed_random_subset_of_a_class_sorted_folder(tmp_path, tiny_space):
    """The first N images of a class-sorted ImageFolder are one class; test_subset draws a
    seeded random subset instead (the same one on every load, a subset of the full test set)."""
    _write_folder(tmp_path, classes=("cat", "dog", "owl"), per_class=10)
    space = tiny_space.with_overrides({"num_classes": 3, "data.dataset": "imagefolder",
                                       "data.root": str(tmp_path), "data.test_subset": 9})
    full = load_splits(space.with_overrides({"data.test_subset": None})).test
    sub = load_splits(space).test
    assert len(sub) == 9 and len(set(sub.labels.tolist())) >= 2, sub.labels.tolist()
    rows = {tuple(img.flatten().tolist()) for img in full.images}
    assert all(tuple(img.flatten().tolist()) in rows for img in sub.images)
    assert torch.equal(load_splits(space).test.images, sub.images)


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


@pytest.fixture
def scratch_datasets(monkeypatch):
    """Datasets a test registers leave with it: the registry is module-level."""
    from exitnas.data import DATASETS

    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))
    return DATASETS


def test_a_dataset_registered_here_loads_and_trains_a_supernet(scratch_datasets, tiny_space,
                                                              tmp_path):
    """A user's dataset is one registered function: before registration ``data.dataset``
    refuses its name in one line; after it, load_splits holds val out of its train split,
    keeps its test split, and one epoch of supernet training runs on it."""
    from exitnas.errors import ConfigError
    from exitnas.rundir import RunDir
    from exitnas.space import load_space
    from exitnas.train import train_supernet
    from exitnas.data import TensorSet
    from conftest import TEST_DATA

    with pytest.raises(ConfigError) as refused:
        load_space(TEST_DATA / "tiny.yaml", {"data.dataset": "stripes"})
    assert "data.dataset: unknown value 'stripes'" in str(refused.value)
    assert "\n" not in str(refused.value)
    g = torch.Generator().manual_seed(7)
    calls = []

    def make(n: int) -> TensorSet:
        labels = torch.arange(n) % 4
        images = torch.randint(0, 60, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
        for k in range(4):  # class k: bright rows k and k + 4
            images[labels == k, :, k::4, :] += 180
        return TensorSet(images, labels)

    train, test = make(160), make(40)

    @scratch_datasets.register("stripes")
    def stripes(space):
        """four classes of bright rows, for this test."""
        calls.append(space.data.dataset)
        return train, test, ("r0", "r1", "r2", "r3")

    space = load_space(TEST_DATA / "tiny.yaml", {"data.dataset": "stripes",
                                                 "supernet.epochs": 1})
    s = load_splits(space)
    assert calls == ["stripes"] and s.classes == ("r0", "r1", "r2", "r3")
    assert torch.equal(s.test.images, test.images) and torch.equal(s.test.labels, test.labels)
    assert len(s.val) == 16 and len(s.train) == 144
    rows = {bytes(x.numpy()) for x in train.images}
    assert {bytes(x.numpy()) for x in torch.cat([s.train.images, s.val.images])} == rows
    run = RunDir(tmp_path / "run")
    run.init(space)
    result = train_supernet(run, space, log=None)  # loads the splits itself
    assert calls == ["stripes", "stripes"]
    assert result.weights.is_file() and len(result.history) == 1
    assert 0.0 <= result.history[0]["val_acc_largest"] <= 1.0
