"""The ``torchvision`` family: a torchvision model's own state dict, loaded through
``backbone.weights``, gives the torchvision model's logits at full depth; parameter counts are
torchvision's; bad weights and impossible depths are refused; depth is elastic.

Models are randomly initialised (nothing is downloaded) at 64 px, batch 2. Before saving, every
normalisation layer's affine weights and ConvNeXt's layer scales are set to random values and
BatchNorm's statistics are measured on a random batch: at their initial values (weight 1,
mean 0, var 1, scale 1e-6) a tensor loaded into the wrong block would go unnoticed."""
from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from exitnas.cli import main
from exitnas.errors import CheckpointError, ConfigError
from exitnas.space import load_space
from exitnas.supernet import Supernet
from exitnas.tv_family import CUTS

LISTED = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
          "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
          "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
          "regnet_y_400mf", "convnext_tiny")  # issue 14's list
CLASSES, SIZE = 10, 64


def tv_model(name: str, seed: int = 0) -> nn.Module:
    """A seeded torchvision model in eval mode with random normalisation weights and layer
    scales, and BatchNorm statistics measured on one random batch (module docs)."""
    from torchvision import models

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = models.get_model(name, weights=None, num_classes=CLASSES)

    def rand(t, lo, hi):
        return lo + (hi - lo) * torch.rand(t.shape, generator=gen)

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(rand(m.weight, 0.5, 1.5))
                m.bias.copy_(rand(m.bias, -0.2, 0.2))
            if hasattr(m, "layer_scale"):  # ConvNeXt's CNBlock
                m.layer_scale.copy_(rand(m.layer_scale, 0.5, 1.5))
        for m in bns:
            m.momentum = None  # running stats = the batch's
        model.train()(torch.randn(8, 3, SIZE, SIZE, generator=gen))
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def space_file(tmp_path, name: str, weights, **backbone) -> str:
    spec = {"name": "tv", "num_classes": CLASSES, "input": {"channels": 3, "size": SIZE},
            "backbone": {"family": "torchvision", "model": name, **backbone,
                         **({"weights": str(weights)} if weights else {})},
            "exits": {"heads": ["linear"], "max_exits": 2}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def inputs() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def backbone_params(net: Supernet) -> int:
    return sum(p.numel() for k, p in net.named_parameters() if not k.startswith("heads."))


def test_listed_models_are_in_the_family():
    assert set(LISTED) <= set(CUTS)


@pytest.mark.parametrize("name", LISTED)
def test_state_dict_gives_torchvision_logits_and_params(tmp_path, name):
    model = tv_model(name)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    net = Supernet(load_space(space_file(tmp_path, name, tmp_path / "w.pth"))).eval()
    x = inputs()
    with torch.no_grad():
        got, want = net.forward_exits(x)[-1], model(x)
    assert got.shape == want.shape == (2, CLASSES)
    assert (want[0] - want[1]).abs().max() > 1e-3  # logits that depend on the input
    assert (got - want).abs().max() <= 1e-5
    assert backbone_params(net) == sum(p.numel() for p in model.parameters())


def test_without_the_weights_the_logits_differ(tmp_path):
    """The parity above comes from the file: the same space without ``weights`` (fresh
    initial weights) does not reproduce the model."""
    model = tv_model("resnet18")
    net = Supernet(load_space(space_file(tmp_path, "resnet18", None))).eval()
    x = inputs()
    with torch.no_grad():
        assert (net.forward_exits(x)[-1] - model(x)).abs().max() > 1e-2


def test_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    model = tv_model("mobilenet_v3_small")
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    net = Supernet(load_space(space_file(tmp_path, "mobilenet_v3_small",
                                         tmp_path / "w.safetensors"))).eval()
    x = inputs()
    with torch.no_grad():
        assert (net.forward_exits(x)[-1] - model(x)).abs().max() <= 1e-5


def test_pth_holding_a_non_tensor_is_refused_in_one_line(tmp_path, capsys):
    """A ``.pth`` whose dict holds a string (a pickle weights_only can read) is refused by the
    CLI: exit 2, one line naming the file and the entry; the supernet is not written."""
    state = tv_model("resnet18").state_dict()
    state["fc.bias"] = "not a tensor"
    torch.save(state, tmp_path / "w.pth")
    run = tmp_path / "run"
    assert main(["train-supernet", space_file(tmp_path, "resnet18", tmp_path / "w.pth"),
                 "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(tmp_path / "w.pth") in err and "'fc.bias' is a str, not a tensor" in err
    assert not (run / "supernet").exists()


def test_another_models_state_dict_is_refused_naming_the_tensor(tmp_path):
    """resnet34's weights into a resnet18 space: its third block of layer1 has no place, and
    the message names it in the file's own names."""
    torch.save(tv_model("resnet34").state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"w\.pth: not a backbone of space 'tv' "
                                              r"\(unexpected tensor 'layer1\.2\.bn1\.bias'\)"):
        Supernet(load_space(space_file(tmp_path, "resnet18", tmp_path / "w.pth")))


def test_state_dict_with_other_classes_is_refused_naming_the_shape(tmp_path):
    from torchvision import models

    torch.save(models.resnet18(num_classes=1000).state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"tensor 'final\.classifier\.weight' has shape "
                                              r"\[1000, 512\], .* needs \[10, 512\]"):
        Supernet(load_space(space_file(tmp_path, "resnet18", tmp_path / "w.pth")))


@pytest.mark.parametrize("name, depths, message", [
    # resnet50's layer1[0] has a projection shortcut (and opens the stage): it always runs
    ("resnet50", [[0, 3], [4], [6], [3]],
     r"backbone\.stage_depths\[0\]: depth 0 is outside 1\.\.3"),
    ("resnet50", [[3], [4], [6], [2, 4]],
     r"backbone\.stage_depths\[3\]: depth 4 is outside 1\.\.3"),
    # mobilenet_v2 features[2] (24 channels, stride 2) has no shortcut: it opens stage 1
    ("mobilenet_v2", [[1], [0, 2], [3], [4], [3], [3], [1]],
     r"backbone\.stage_depths\[1\]: depth 0 is outside 1\.\.2"),
    ("mobilenet_v2", [[1], [2]], r"backbone\.stage_depths: 2 stages given, the backbone has 7"),
    ("efficientnet_b0", [[1], [2], [2], [3], [3], [2, 1], [1]],
     r"backbone\.stage_depths\[5\]: must be strictly increasing"),
])
def test_depths_that_skip_a_block_without_shortcut_are_refused(tmp_path, name, depths, message):
    with pytest.raises(ConfigError, match=message):
        load_space(space_file(tmp_path, name, None, stage_depths=depths))


def test_unknown_model_is_refused_listing_the_known(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone\.model: unknown torchvision model "
                                          r"'resnet19' \(supported: .*resnet18, resnet34"):
        load_space(space_file(tmp_path, "resnet19", None))


def _cut_resnet(model, depths):
    for i, d in enumerate(depths, start=1):
        setattr(model, f"layer{i}", getattr(model, f"layer{i}")[:d])
    return model


def _cut_efficientnet(model, depths):
    for i, d in enumerate(depths, start=1):
        model.features[i] = model.features[i][:d]
    return model


@pytest.mark.parametrize("name, stage_depths, shallow, cut", [
    ("resnet18", [[1, 2]] * 4, (1, 2, 1, 1), _cut_resnet),
    ("efficientnet_b0", [[1], [1, 2], [1, 2], [2, 3], [1, 3], [2, 4], [1]],
     (1, 1, 2, 2, 3, 2, 1), _cut_efficientnet),
])
def test_elastic_depth_runs_the_first_blocks_with_every_exit(tmp_path, name, stage_depths,
                                                             shallow, cut):
    """At a shallower depth setting the final exit equals the torchvision model with the
    skipped blocks removed, and every candidate exit of that setting gives logits."""
    model = tv_model(name)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    space = load_space(space_file(tmp_path, name, tmp_path / "w.pth", stage_depths=stage_depths))
    net = Supernet(space).eval()
    assert space.max_depths == tuple(max(d) for d in stage_depths)
    positions = space.positions(shallow)
    assert len(positions) == sum(shallow) - 1  # after any block that runs but the last
    assert {f"s{s}b{b}=linear" for s, b in space.positions(space.max_depths)} == set(net.heads)
    x = inputs()
    with torch.no_grad():
        out = net.forward_exits(x, shallow)
        want = cut(model, shallow)(x)
    assert len(out) == len(positions) + 1
    assert all(o.shape == (2, CLASSES) and torch.isfinite(o).all() for o in out)
    assert (out[-1] - want).abs().max() <= 1e-5
