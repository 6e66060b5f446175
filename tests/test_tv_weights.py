"""``backbone.weights: torchvision:ENUM``: torchvision's download cache is used when it holds
the file (no network touched), a machine without a network gets one line saying what to do,
and an unknown enum is refused when the space is read. Nothing here downloads anything: the
offline case runs inside a network namespace with no interface but loopback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from exitnas.errors import ConfigError
from exitnas.space import load_space
from exitnas.supernet import Supernet
from search_support import namespaces_work


def _space(tmp_path, weights: str, classes: int = 1000):
    spec = {"name": "tvw", "num_classes": classes, "input": {"channels": 3, "size": 64},
            "backbone": {"family": "torchvision", "model": "resnet18", "weights": weights},
            "exits": {"heads": ["linear"], "max_exits": 1}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cached_enum_weights_load_without_network(tmp_path, monkeypatch):
    """A state dict planted where torch.hub caches resnet18's IMAGENET1K_V1 is what the
    supernet's backbone holds: its final logits equal that model's."""
    from torchvision import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    model = models.resnet18(num_classes=1000).eval()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(model.state_dict(), cache / "resnet18-f37072fd.pth")
    net = Supernet(load_space(_space(tmp_path, "torchvision:IMAGENET1K_V1"))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (net.forward_exits(x)[-1] - model(x)).abs().max() <= 1e-5


def test_unknown_enum_is_refused_when_the_space_is_read(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone\.weights: .*resnet18 has no weights "
                                          r"'IMAGENET9K'.*known: IMAGENET1K_V1"):
        load_space(_space(tmp_path, "torchvision:IMAGENET9K"))


@pytest.mark.skipif(not namespaces_work(), reason="needs root, unshare and ip for a "
                                                   "network namespace without a network")
def test_no_network_gives_one_line_saying_what_to_do(tmp_path):
    """Growing a supernet from torchvision:IMAGENET1K_V1 with an empty cache and no network:
    exit 2, one line naming the value, the URL and the file to copy in; the run directory gets
    no supernet."""
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "exitnas", "train-supernet", str(_space(tmp_path, "torchvision:IMAGENET1K_V1")),
           "--run-dir", str(run)]
    r = subprocess.run(["unshare", "--net", *cmd], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "'torchvision:IMAGENET1K_V1'" in lines[0]
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in lines[0]
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in lines[0]
    assert not (run / "supernet").exists()


def test_enum_weights_bring_their_normalisation_and_class_names(tmp_path):
    """Without data.mean / std the splits use the normalisation torchvision's weights were
    trained with (not statistics of the user's images); data.mean / std still win; the
    weights' class names are what the export records beside the dataset's."""
    import yaml as _yaml

    from exitnas.data import load_splits

    path = _space(tmp_path, "torchvision:IMAGENET1K_V1")
    spec = _yaml.safe_load(path.read_text())
    spec["data"] = {"dataset": "synthetic", "synthetic_size": 2000}
    path.write_text(_yaml.safe_dump(spec))
    space = load_space(path)
    meta = space.family.weights_meta(space.backbone)
    assert meta["source"] == "torchvision:IMAGENET1K_V1"
    assert len(meta["categories"]) == 1000 and meta["categories"][0] == "tench"
    splits = load_splits(space)
    assert splits.mean == (0.485, 0.456, 0.406) and splits.std == (0.229, 0.224, 0.225)
    own = load_splits(space.with_overrides({"data.mean": [0.5, 0.5, 0.5]}))
    assert own.mean == (0.5, 0.5, 0.5) and own.std == (0.229, 0.224, 0.225)
    plain = load_splits(space.with_overrides({"backbone.weights": None}))
    assert plain.mean != splits.mean  # measured on the images instead
