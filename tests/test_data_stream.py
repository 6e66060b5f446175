"""The streaming ImageFolder path (issue 14, part 6): ``data.loader: auto | memory | stream``.

A small ImageFolder (3 classes, PNG and JPEG files of 32x32) is written here with PIL; the
space reads it at 28 px, so the evaluation view (Resize(round(28 / 0.875)) = 32, no resize,
then CenterCrop(28)) is exactly the pixels [2:30, 2:30] of each file.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TEST_DATA
from exitnas.data import batches, load_splits
from exitnas.errors import DataError
from exitnas.space import load_space

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, PX, SIZE = 3, 20, 5, 32, 28
ARCH = "d2.2~s0b1=conv~max_softmax=0.6"


def _write_folder(root: Path) -> Path:
    """root/{train,test}/c<k>/NN.{png,jpg}: class k tints channel k over a diagonal gradient
    and per-image noise, so every crop, flip and file differs."""
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(PX), 2 * np.arange(PX)).astype(np.float64) * 2
    for split, per in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for k in range(CLASSES):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(per):
                img = rng.integers(0, 60, (PX, PX, 3)).astype(np.float64)
                img[..., k] += 100
                img += ramp[..., None] * (i % 3 + 1) / 3
                pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
                ext = "png" if i % 2 == 0 else "jpg"
                pil.save(folder / f"{i:02d}.{ext}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("stream") / "folder")


def _space(root: Path, **over):
    o = {"num_classes": CLASSES, "input.size": SIZE, "data.dataset": "imagefolder",
         "data.root": str(root), "data.loader": "stream", "data.batch_size": 16,
         "data.eval_batch_size": 32, "data.mean": [0.5, 0.5, 0.5], "data.std": [0.25, 0.25, 0.25]}
    o.update(over)
    return load_space(TEST_DATA / "tiny.yaml", o)


def _raw(path: Path) -> torch.Tensor:
    """The file as PIL decodes it: uint8 [3, H, W]."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _norm(images: torch.Tensor, s) -> torch.Tensor:
    return (images.float() / 255 - torch.tensor(s.mean).view(1, -1, 1, 1)) / \
        torch.tensor(s.std).view(1, -1, 1, 1)


# ---- batches ---------------------------------------------------------------------------------
def test_train_batches_are_augmented_and_depend_only_on_seed_and_epoch(folder):
    """The loop's training batches: input size, augmented (two epochs differ, and neither is
    the evaluation view), the same for the same (seed, epoch) whatever the worker count."""
    from exitnas.loop import train_batches
    from exitnas._dist import Dist

    s = load_splits(_space(folder))
    assert s.train.streams and len(s.train) == 54 and len(s.val) == 6

    def epoch(sp, e, seed=0):
        data, steps = train_batches(sp, _space(folder), seed=seed, epoch=e, dist=Dist(),
                                    batch_size=16)
        out = list(data)
        assert len(out) == steps == 3
        return out

    e0, e0_again, e1 = epoch(s, 0), epoch(s, 0), epoch(s, 1)
    assert all(x.shape == (16, 3, SIZE, SIZE) and x.dtype == torch.float32 for x, _ in e0)
    for (a, ya), (b, yb) in zip(e0, e0_again):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([x for x, _ in e0]), torch.cat([x for x, _ in e1]))
    assert not torch.equal(torch.cat([y for _, y in e0]), torch.cat([y for _, y in e1]))
    assert not torch.equal(e0[0][0], epoch(s, 0, seed=1)[0][0])
    plain = list(batches(s.train, batch_size=16, mean=s.mean, std=s.std, shuffle=True,
                         seed=100_003 * 0 + 0, drop_last=True))
    assert [y.tolist() for _, y in plain] == [y.tolist() for _, y in e0]  # same order...
    assert not torch.equal(plain[0][0], e0[0][0])                          # ...augmented
    s2 = load_splits(_space(folder, **{"data.num_workers": 2}))
    for (a, _), (b, _) in zip(e0, epoch(s2, 0)):
        assert torch.equal(a, b)


def test_eval_batches_are_centre_crops_of_the_files(folder):
    """val / test batches (and BN calibration's) are the evaluation view: each file's centre
    28x28 pixels, normalised, deterministic; calibration draws train images in that view."""
    from exitnas.supernet import calibration_batches

    space = _space(folder)
    s = load_splits(space)
    for part in (s.val, s.test):
        got = torch.cat([x for x, _ in batches(part, batch_size=4, mean=s.mean, std=s.std)])
        again = torch.cat([x for x, _ in batches(part, batch_size=32, mean=s.mean, std=s.std)])
        want = torch.stack([_raw(p)[:, 2:30, 2:30] for p in part.paths()])
        assert got.shape == (len(part), 3, SIZE, SIZE)
        assert torch.equal(got, again) and torch.allclose(got, _norm(want, s), atol=1e-6)
    view = {hashlib.sha256(x.numpy().tobytes()).hexdigest()
            for x in _norm(torch.stack([_raw(p)[:, 2:30, 2:30] for p in s.train.paths()]), s)}
    calib = list(calibration_batches(space, s))
    assert len(calib) == space.supernet.bn_calib_batches
    assert all(hashlib.sha256(x.numpy().tobytes()).hexdigest() in view
               for b, _ in calib for x in b)


def test_val_indices_equal_the_memory_path(folder):
    """The same folder and split settings hold out the same files as val (and keep the same
    train and test files) in memory and streamed: the memory path at 32 px keeps the files'
    pixels, which name them."""
    common = {"data.train_subset": 50, "data.test_subset": 9, "data.split_seed": 3}
    mem = load_splits(_space(folder, **common, **{"data.loader": "memory", "input.size": PX}))
    st = load_splits(_space(folder, **common))
    assert not mem.train.streams and st.train.streams
    for m, s in ((mem.train, st.train), (mem.val, st.val), (mem.test, st.test)):
        assert torch.equal(m.labels, s.labels)
        assert torch.equal(m.images, torch.stack([_raw(p) for p in s.paths()]))
    assert len(st.val) == 5 and len(st.test) == 9


def test_auto_streams_an_imagefolder_above_the_threshold(folder):
    """``auto``: decoded train + test bytes (75 files x 3 x 28 x 28 = 176,400) above
    ``data.stream_threshold`` stream, at or below it stay in memory; a set that cannot stream
    (synthetic) stays in memory whatever the threshold."""
    decoded = (CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS)) * 3 * SIZE * SIZE
    assert decoded == 176_400
    above = load_splits(_space(folder, **{"data.loader": "auto",
                                          "data.stream_threshold": decoded - 1}))
    below = load_splits(_space(folder, **{"data.loader": "auto",
                                          "data.stream_threshold": decoded}))
    assert above.train.streams and above.test.streams
    assert not below.train.streams and not below.test.streams
    synth = load_splits(load_space(TEST_DATA / "tiny.yaml", {"data.stream_threshold": 0}))
    assert synth.train.images.dtype == torch.uint8 and not synth.train.streams


def test_unset_mean_and_std_are_measured_on_sampled_train_images(folder):
    from exitnas import stream

    s = load_splits(_space(folder, **{"data.mean": None, "data.std": None}))
    x = torch.stack([_raw(p)[:, 2:30, 2:30] for p in s.train.paths()]).float() / 255
    assert len(s.train) < stream.STATS_IMAGES  # the sample is every train image here
    assert np.allclose(s.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-5)
    assert np.allclose(s.std, x.std(dim=(0, 2, 3)).tolist(), atol=1e-5)


# ---- refusals --------------------------------------------------------------------------------
def _cli(argv) -> tuple[int, str]:
    from exitnas.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


@pytest.mark.parametrize("key, value, expect", [
    ("loader", "disk", "data.loader: 'disk' is not one of 'auto', 'memory', 'stream'"),
    ("loader", 1, "data.loader: 1 is not one of"),
    ("stream_threshold", -1, "data.stream_threshold: -1 is not >= 0"),
    ("stream_threshold", "2GB", "data.stream_threshold: expected an integer"),
    ("num_workers", -2, "data.num_workers: -2 is not >= 0"),
])
def test_bad_loader_values_are_refused_in_one_line(tmp_path, key, value, expect):
    import yaml

    tree = yaml.safe_load((TEST_DATA / "tiny.yaml").read_text())
    tree["data"][key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    code, err = _cli(["space", "check", path])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and expect in err, err


def test_stream_is_refused_for_a_dataset_that_loads_into_memory(tmp_path):
    """``loader: stream`` with the synthetic set: one line naming the field and the dataset,
    exit 2, and the existing run directory is left as it was."""
    from conftest import tree_digest
    from exitnas.rundir import RunDir

    space = load_space(TEST_DATA / "tiny.yaml", {"data.loader": "stream"})
    with pytest.raises(DataError, match="data.loader 'stream': dataset 'synthetic'"):
        load_splits(space)
    run = RunDir(tmp_path / "run")
    run.init(space)
    before = tree_digest(run.path)
    code, err = _cli(["train-supernet", TEST_DATA / "tiny.yaml", "--run-dir", run.path,
                      "--set", "data.loader=stream"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "data.loader 'stream'" in err and "Traceback" not in err
    assert tree_digest(run.path) == before


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_or_disallowed_file_stops_the_pass_in_one_line(folder, tmp_path, workers):
    """A truncated PNG and a real TGA image (a format off the allowlist) in a streamed set:
    iterating stops with a DataError naming the file, in the main process or a worker."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root, ignore=shutil.ignore_patterns(".exitnas-cache"))
    good = (root / "test/c1/00.png").read_bytes()
    for name, make in (("00.png", lambda p: p.write_bytes(good[:len(good) // 3])),
                       ("02.png", lambda p: Image.new("RGB", (PX, PX)).save(p, format="TGA"))):
        target = root / "test/c1" / name
        make(target)
        s = load_splits(_space(root, **{"data.num_workers": workers}))
        with pytest.raises(DataError) as err:
            list(batches(s.test, batch_size=4, mean=s.mean, std=s.std))
        text = str(err.value)
        assert str(target) in text and "cannot read image" in text and "\n" not in text
        target.write_bytes(good)
    s = load_splits(_space(root, **{"data.num_workers": workers}))
    assert sum(len(y) for _, y in batches(s.test, batch_size=4, mean=s.mean, std=s.std)) == 15


def test_a_checkpoint_made_before_the_loader_fields_resumes_only_at_their_defaults(tmp_path):
    """Settings that a checkpoint predates (it has no ``data.loader``) compare as their
    defaults: it resumes with ``auto`` and is refused, naming the field, with ``stream``."""
    from exitnas._checkpoint import open_checkpoint
    from exitnas._config import to_dict
    from exitnas.errors import CheckpointError
    from exitnas.io import save_checkpoint

    space = load_space(TEST_DATA / "tiny.yaml")
    old = to_dict(space.data)
    del old["loader"], old["stream_threshold"]
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"identity": {"kind": "x"}, "settings": {"data": old}, "epoch": 1,
                           "model": {}})
    now = {"data": to_dict(space.data)}
    assert open_checkpoint(path, identity={"kind": "x"}, settings=now, resume=True,
                           restart=False)["epoch"] == 1
    for key, value in (("data.loader", "stream"), ("data.stream_threshold", 5)):
        changed = {"data": to_dict(space.with_overrides({key: value}).data)}
        with pytest.raises(CheckpointError, match=f"made with {key}=None, this run has {key}="):
            open_checkpoint(path, identity={"kind": "x"}, settings=changed, resume=True,
                            restart=False)


# ---- the pipeline on streamed data -----------------------------------------------------------
def _pipeline(root: Path, work: Path, workers: int) -> dict:
    from safetensors.torch import load_file

    from exitnas import runtime
    from exitnas.arch import Arch
    from exitnas.evaluate import load_or_build_cache
    from exitnas.export import export_run
    from exitnas.finetune import finetune
    from exitnas.report import write_report
    from exitnas.retrain import retrain
    from exitnas.rundir import RunDir
    from exitnas.supernet import Supernet
    from exitnas.train import train_supernet

    space = _space(root, **{"data.num_workers": workers, "supernet.epochs": 2,
                            "retrain.epochs": 1})
    run = RunDir(work / f"run{workers}")
    run.init(space)
    result = train_supernet(run, space, log=None)
    s = load_splits(space)
    net = Supernet(space, pretrained=False).load(result.weights)
    arch = Arch.parse(ARCH).validate(space)
    cache = load_or_build_cache(run, net, arch.depths, s)
    test_cache = load_or_build_cache(run, net, arch.depths, s, split="test")
    out = export_run(run, arch, run.path / "export" / "a", onnx=False).out
    x, y = next(batches(s.test, batch_size=15, mean=s.mean, std=s.std))
    pred = runtime.load(out).predict(x.numpy())
    tuned = finetune(run, arch, space=space, regime="mixed", log=None)
    retrained = retrain(run, arch, space=space, regime="joint", log=None)
    report = write_report(run)
    return {"weights": load_file(str(result.weights)), "conf": cache.conf, "pred": cache.pred,
            "test_labels": test_cache.labels, "y": y, "runtime": pred, "report": report,
            "history": result.history, "tuned": tuned, "retrained": retrained}


def test_supernet_cache_export_finetune_retrain_and_report_run_on_streamed_data(folder,
                                                                              tmp_path):
    """Supernet training (2 epochs, BN calibration each epoch), the val and test caches, an
    export, a fine-tune, a retrain and the report run on the streaming path with 0 and with 2
    workers, and give the same weights and cached logits either way; the export predicts with
    early exit; the report scores all three models on val and test."""
    torch.set_num_threads(1)
    a, b = _pipeline(folder, tmp_path, 0), _pipeline(folder, tmp_path, 2)
    assert len(a["history"]) == 2 and a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(v, b["weights"][k]) for k, v in a["weights"].items())
    assert torch.equal(a["conf"], b["conf"]) and torch.equal(a["pred"], b["pred"])
    assert a["conf"].shape[1] == 6 and torch.equal(a["test_labels"], a["y"])
    for r in (a, b):
        assert len(r["runtime"].pred) == 15 and set(r["runtime"].exit.tolist()) <= {0, 1, 2}
        assert len(r["report"].models) == 3 and (r["report"].folder / "report.md").is_file()
        assert len(r["tuned"].history) == 1 and len(r["retrained"].history) == 1
    for key in ("tuned", "retrained"):  # the same losses and accuracies, row by row
        rows = [[{k: v for k, v in row.items() if k != "seconds"} for row in r[key].history]
                for r in (a, b)]
        assert rows[0] == rows[1]
