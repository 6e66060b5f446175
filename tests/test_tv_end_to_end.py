"""Bring your own backbone, end to end: ``exitnas run`` on a small ImageFolder (CIFAR-10 JPEG
images, 4 classes, upscaled to 64 px by the loader) with torchvision's resnet18 started from a
state dict saved by ``torch.save(model.state_dict())``: elastic depth in every stage, every head
design at every position, the streaming loader. Its export predicts with early exit: some test
images leave before the final exit, and the runtime agrees with the exported model."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import run_cli

CLASSES = ("airplane", "automobile", "cat", "ship")


def _folder(cifar10_root, dest, per_class: dict[str, int]):
    for split, n in per_class.items():
        for c in CLASSES:
            (dest / split / c).mkdir(parents=True)
            for f in sorted((cifar10_root / split / c).iterdir())[:n]:
                shutil.copy(f, dest / split / c / f.name)


@pytest.mark.slow
def test_run_with_a_torchvision_resnet18_from_a_state_dict(tmp_path, cifar10_root):
    from torchvision import models

    data = tmp_path / "images"
    _folder(cifar10_root, data, {"train": 100, "test": 25})
    torch.manual_seed(0)
    torch.save(models.resnet18(num_classes=len(CLASSES)).state_dict(), tmp_path / "r18.pth")
    spec = {
        "name": "r18_folder", "num_classes": len(CLASSES), "input": {"channels": 3, "size": 64},
        "backbone": {"family": "torchvision", "model": "resnet18",
                     "stage_depths": [[1, 2], [1, 2], [1, 2], [1, 2]],
                     "weights": str(tmp_path / "r18.pth")},
        "exits": {"positions": "all", "heads": ["linear", "sdn_pool", "conv", "mlp"],
                  "max_exits": 3},
        "policy": {"names": ["max_softmax"]},
        "data": {"dataset": "imagefolder", "root": str(data), "loader": "stream",
                 "num_workers": 2, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "batch_size": 32, "eval_batch_size": 64},
        "supernet": {"epochs": 1, "optim": {"lr": 0.01}, "bn_calib_batches": 2},
        "search": {"trials": 40, "population_size": 10, "budget_fraction": 0.8,
                   "deploy_budgets": [0.5]},
    }
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    r = run_cli("run", space, "--run-dir", run, timeout=1800,
                env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (run / "backbone").exists()  # the user's weights are the backbone: no stage 0
    exports = [p for p in (run / "export").iterdir() if (p / "arch.json").is_file()]
    assert exports, r.stdout[-2000:]
    export = exports[0]
    manifest = json.loads((export / "arch.json").read_text())
    assert manifest["input"]["shape"] == [3, 64, 64]
    # streamed evaluation view (shorter side 73, centre crop 64): the runtime applies it
    assert manifest["input"]["view"] == {"resize": "shorter_side", "shorter": 73, "crop": 64}
    assert len(manifest["exits"]) >= 2  # at least one early exit, then the final one

    p = run_cli("predict", export, data / "test", "--format", "json", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout)["predictions"]
    exits = [row["exit"] for row in rows]
    assert len(rows) == 25 * len(CLASSES)
    final = len(manifest["exits"]) - 1
    assert any(e < final for e in exits), "no test image left early at a 50 % budget"
