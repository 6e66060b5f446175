"""ONNX end to end: `exitnas run` exports ONNX for the quickstart (whose last stage gives 2x2
maps to SDN's 4x4 pooling) and for a 28x28 one-channel ImageFolder space (7x7 maps), and the
runtime's ONNX backend makes the same predictions and exits as the .pt2 one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SPACES, run_cli
from test_heads import needs_onnx

pytestmark = needs_onnx

FOLDER_SPACE = """
name: folder28
version: 1
num_classes: 3
input: {{channels: 1, size: 28}}
backbone:
  family: resnet
  block: basic
  stem: cifar
  stem_channels: 8
  stages:
    - {{channels: 8, stride: 1, depths: [1, 2]}}
    - {{channels: 16, stride: 2, depths: [1, 2]}}
    - {{channels: 16, stride: 2, depths: [1, 2]}}
exits:
  positions: all
  heads: [linear, sdn_pool, conv, mlp]
  max_exits: 2
data:
  dataset: imagefolder
  root: {root}
  val_fraction: 0.2
  augment: false
  batch_size: 16
backbone_training:
  epochs: 2
  optim: {{lr: 0.05}}
supernet:
  epochs: 2
  optim: {{lr: 0.05}}
  random_subnets: 1
  bn_calib_batches: 2
search:
  trials: 8
  population_size: 4
  budget_fraction: 0.9
retrain:
  regime: mixed
  epochs: 2
  optim: {{lr: 0.05}}
"""
FOLDER_ARCH = "d2.2.2~s1b1=sdn_pool,s2b0=sdn_pool~max_softmax=0.6,0.7"  # 14x14 and 7x7 maps


def _write_folder(root: Path, per_class: dict[str, int]) -> None:
    """28x28 grey PNGs in root/<split>/<class>/: class k is a bright bar at row band k over
    noise, so a few epochs learn it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for k in range(3):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (28, 28), dtype=np.uint8)
                img[4 + 8 * k: 10 + 8 * k, rng.integers(0, 8):] = 230
                Image.fromarray(img, mode="L").save(folder / f"{i:03d}.png")


def _predict(export: Path, images: Path, backend: str) -> list[tuple]:
    proc = run_cli("predict", export, images, "--backend", backend, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return [(r["file"], r["pred"], r["exit"], r["macs"]) for r in json.loads(proc.stdout)["predictions"]]


def _check_exports(run_dir: Path, images: Path) -> list[Path]:
    """Every export of the run holds an ONNX file per graph, and ONNX Runtime predicts what
    the .pt2 programs predict, with the same exits."""
    exports = sorted(p for p in (run_dir / "export").iterdir() if (p / "arch.json").is_file())
    assert exports
    for out in exports:
        m = json.loads((out / "arch.json").read_text())
        assert m["onnx_skipped"] is None
        for name, g in m["graphs"].items():
            assert (out / g["onnx"]).is_file() and g["onnx_max_abs_diff"] <= 1e-4, name
        assert _predict(out, images, "onnx") == _predict(out, images, "pt2")
    return exports


def _write_digits(root: Path, n: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.mkdir(parents=True)
    for i in range(n):  # the bundled 8x8 digits as 0-255 PNGs
        img = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(img, mode="L").save(root / f"{i:03d}.png")


# the quickstart's network and input, hence its graphs, with fewer epochs and trials
QUICK = ["--set", "backbone_training.epochs=2", "--set", "supernet.epochs=2", "--set",
         "search.trials=24"]


@pytest.mark.slow
def test_quickstart_run_exports_onnx(tmp_path):
    """The quickstart space, every extra installed: `exitnas run` exits 0 and writes ONNX; an
    arch with SDN heads at 4x4 and 2x2 maps (pooled to 4x4: repeated windows) exports too."""
    run_dir = tmp_path / "q"
    proc = run_cli("run", SPACES / "quickstart.yaml", "--run-dir", run_dir, *QUICK, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = tmp_path / "digits"
    _write_digits(images, 40)
    arch = "d1.1.2~s1b0=sdn_pool,s2b0=sdn_pool~max_softmax=0.8,0.9"
    done = run_cli("export", run_dir, "--arch", arch)
    assert done.returncode == 0, done.stderr
    exports = _check_exports(run_dir, images)
    assert any(p.name.startswith("d1.1.2~s1b0=sdn_pool,s2b0=sdn_pool") for p in exports)


@pytest.mark.slow
def test_imagefolder_28x28_grey_runs_end_to_end_with_onnx(tmp_path):
    """A 28x28 one-channel ImageFolder space made here: `exitnas run` (small epochs and trials)
    exits 0 with ONNX exports, an arch with SDN heads on 14x14 and 7x7 maps exports, and ONNX
    Runtime and the .pt2 programs agree on every test image."""
    data = tmp_path / "data"
    _write_folder(data, {"train": 40, "test": 10})
    space = tmp_path / "folder28.yaml"
    space.write_text(FOLDER_SPACE.format(root=data))
    run_dir = tmp_path / "run"
    proc = run_cli("run", space, "--run-dir", run_dir, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = run_cli("export", run_dir, "--arch", FOLDER_ARCH)
    assert done.returncode == 0, done.stderr
    exports = _check_exports(run_dir, data / "test")
    m = json.loads((run_dir / "export" / FOLDER_ARCH / "arch.json").read_text())
    assert m["input"]["shape"] == [1, 28, 28]
    assert [m["graphs"][f"head_{k}"]["input"][2:] for k in range(2)] == [[14, 14], [7, 7]]
    assert FOLDER_ARCH in {p.name for p in exports}
