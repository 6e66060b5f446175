"""The ``torchvision`` backbone family: a torchvision classification model as an exitnas
backbone, its modules and weights unchanged.

    backbone: {family: torchvision, model: resnet50, stage_depths: [[3], [2, 3, 4], [3, 6], [3]]}

Each supported model is cut into a stem, stages of blocks and a final head the way the model
itself is built (ResNet's ``layer1..4``; MobileNet's ``features`` split where a block has no
identity shortcut; EfficientNet's and RegNet's stages; ConvNeXt's stages, each but the first
opened by its downsampling layer). A block may be skipped only when it has an identity
shortcut (ResNet ``downsample is None``, MobileNet / EfficientNet ``use_res_connect``, RegNet
``proj is None``, every ConvNeXt block). ``sources`` records where every module came from, so a
torchvision state dict loads by name (:func:`exitnas.backbone.load_backbone`).

At full depth with no early exit the supernet computes exactly the torchvision model's forward
(eval mode); ``tests/test_tv_family.py`` checks the logits of every supported model.
"""
from __future__ import annotations

import functools
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .topology import FAMILIES, Structure, Topology

Named = list[tuple[str, nn.Module]]  # (torchvision module path, module)


@dataclass
class Cut:
    """A torchvision model taken apart: stem modules, per stage its blocks with whether each
    has an identity shortcut, the modules before pooling in the final head, the pooling and
    the classifier (``flatten``: whether the model flattens between them)."""

    stem: Named
    stages: list[list[tuple[Named, bool]]]  # per block: its module(s), identity shortcut
    pre: Named
    pool: tuple[str, nn.Module]
    classifier: tuple[str, nn.Module]
    flatten: bool = True


def _children(parent: nn.Module, prefix: str) -> Named:
    return [(f"{prefix}.{n}", m) for n, m in parent.named_children()]


def _resnet(m) -> Cut:
    stages = [[([(p, blk)], blk.downsample is None) for p, blk in _children(getattr(m, f"layer{i}"), f"layer{i}")]
              for i in range(1, 5)]
    return Cut(stem=[(n, getattr(m, n)) for n in ("conv1", "bn1", "relu", "maxpool")],
               stages=stages, pre=[], pool=("avgpool", m.avgpool), classifier=("fc", m.fc))


def _split_by_shortcut(blocks: Named, residual: Callable[[nn.Module], bool]):
    """A flat block list -> stages: a new stage opens at every block without a shortcut."""
    stages: list[list[tuple[Named, bool]]] = []
    for path, blk in blocks:
        has = residual(blk)
        if not stages or not has:
            stages.append([])
        stages[-1].append(([(path, blk)], has))
    return stages


def _mobilenet(m) -> Cut:
    feats = _children(m.features, "features")
    pool = ("avgpool", m.avgpool) if hasattr(m, "avgpool") else ("avgpool", nn.AdaptiveAvgPool2d(1))
    return Cut(stem=feats[:1], stages=_split_by_shortcut(feats[1:-1], lambda b: b.use_res_connect),
               pre=feats[-1:], pool=pool, classifier=("classifier", m.classifier))


def _efficientnet(m) -> Cut:
    feats = _children(m.features, "features")
    stages = [[([(p, blk)], blk.use_res_connect) for p, blk in _children(stage, path)]
              for path, stage in feats[1:-1]]
    return Cut(stem=feats[:1], stages=stages, pre=feats[-1:], pool=("avgpool", m.avgpool),
               classifier=("classifier", m.classifier))


def _regnet(m) -> Cut:
    stages = [[([(p, blk)], blk.proj is None) for p, blk in _children(stage, path)]
              for path, stage in _children(m.trunk_output, "trunk_output")]
    return Cut(stem=[("stem", m.stem)], stages=stages, pre=[], pool=("avgpool", m.avgpool),
               classifier=("fc", m.fc))


def _convnext(m) -> Cut:
    feats = _children(m.features, "features")
    stages, down = [], None
    for i, (path, mod) in enumerate(feats[1:], start=1):
        if i % 2 == 0:  # features[2], [4], [6]: downsampling between stages
            down = (path, mod)
            continue
        blocks = [([(p, blk)], True) for p, blk in _children(mod, path)]
        if down is not None:  # the downsampling layer opens the stage with its first block
            blocks[0] = ([down, *blocks[0][0]], False)
        stages.append(blocks)
    return Cut(stem=feats[:1], stages=stages, pre=[], pool=("avgpool", m.avgpool),
               classifier=("classifier", m.classifier), flatten=False)


CUTS: dict[str, Callable[[nn.Module], Cut]] = {
    **{n: _resnet for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                            "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                            "wide_resnet50_2", "wide_resnet101_2")},
    **{n: _mobilenet for n in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")},
    **{f"efficientnet_b{i}": _efficientnet for i in range(8)},
    **{f"regnet_{k}_{s}": _regnet for k in ("x", "y")
       for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")},
    **{f"convnext_{s}": _convnext for s in ("tiny", "small", "base", "large")},
}


class Final(nn.Module):
    """The model's classifier end: ``pre`` modules, pooling, flatten (when the model does),
    classifier."""

    def __init__(self, *, pre: nn.Module | None, pool: nn.Module, classifier: nn.Module,
                 flatten: bool) -> None:
        super().__init__()
        self.pre, self.pool, self.classifier, self.flatten = pre, pool, classifier, flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x if self.pre is None else self.pre(x))
        return self.classifier(torch.flatten(x, 1) if self.flatten else x)


def _local(path: str) -> str:
    return path.replace(".", "_")


def _container(named: Named, where: str, sources: list) -> nn.Module:
    """One module holding ``named`` under their paths (dots -> '_'), or the module itself."""
    if len(named) == 1:
        sources.append((where, named[0][0]))
        return named[0][1]
    for path, _ in named:
        sources.append((f"{where}.{_local(path)}", path))
    return nn.Sequential(OrderedDict((_local(p), mod) for p, mod in named))


def _model(name: str, num_classes: int) -> nn.Module:
    from torchvision import models

    return models.get_model(name, weights=None, num_classes=num_classes)


def assemble(cut: Cut) -> Topology:
    """A :class:`Cut` as the supernet's stem / stages / final, with their sources."""
    sources: list[tuple[str, str]] = []
    stem = _container(cut.stem, "stem", sources)
    stages = [[_container(named, f"stages.{s}.{b}", sources) for b, (named, _) in enumerate(st)]
              for s, st in enumerate(cut.stages)]
    pre = _container(cut.pre, "final.pre", sources) if cut.pre else None
    sources += [(f"final.pool", cut.pool[0]), ("final.classifier", cut.classifier[0])]
    final = Final(pre=pre, pool=cut.pool[1], classifier=cut.classifier[1], flatten=cut.flatten)
    skippable = tuple(tuple(b > 0 and has for b, (_, has) in enumerate(st)) for st in cut.stages)
    return Topology(stem=stem, stages=stages, final=final, sources=tuple(sources),
                    structure=Structure(skippable=skippable, widths=()))


@functools.lru_cache(maxsize=32)
def describe(name: str) -> Structure:
    """Stages, skippable blocks and output widths of torchvision model ``name``, found on the
    meta device (no weights made) where its builder allows, else on the CPU without moving
    the global RNG."""
    try:
        with torch.device("meta"):
            return _describe(name)
    except NotImplementedError:  # a builder computes with tensors (RegNet's widths)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            return _describe(name)


def _describe(name: str) -> Structure:
    topo = assemble(CUTS[name](_model(name, 10).eval()))
    widths, x = [], topo.stem(torch.zeros(1, 3, 64, 64))
    for stage in topo.stages:
        row = []
        for block in stage:
            x = block(x)
            row.append(int(x.shape[1]))
        widths.append(tuple(row))
    return Structure(skippable=topo.structure.skippable, widths=tuple(widths))


WEIGHTS_PREFIX = "torchvision:"
HASH_SUFFIX = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's convention: name-<sha256 prefix>.pth


def _weights_enum(model: str, spec: str):
    from torchvision import models

    enum = models.get_model_weights(model)
    name = spec[len(WEIGHTS_PREFIX):]
    if name not in enum.__members__:
        raise ConfigError(f"{spec!r}: {model} has no weights {name!r} (known: "
                          f"{', '.join(enum.__members__)})", path="weights")
    return enum[name]


class TorchvisionFamily:
    """``family: torchvision`` (module docs)."""

    batchnorm_folded = True  # torchvision's published GFLOPS count no BatchNorm (exitnas.cost)

    def check(self, cfg) -> None:
        for name in ("block", "stages", "final_channels"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"does not apply to family 'torchvision' (its blocks come "
                                  f"from backbone.model)", path=name)
        if cfg.model is None:
            raise ConfigError("is required by family 'torchvision' (e.g. resnet50)", path="model")
        if cfg.model not in CUTS:
            raise ConfigError(f"unknown torchvision model {cfg.model!r} (supported: "
                              f"{', '.join(sorted(CUTS))})", path="model")
        if cfg.stage_depths is not None:
            describe(cfg.model).check_depths(cfg.stage_depths, path="stage_depths")
        if (cfg.weights or "").startswith(WEIGHTS_PREFIX):
            _weights_enum(cfg.model, cfg.weights)

    def stage_depths(self, cfg) -> tuple[tuple[int, ...], ...]:
        if cfg.stage_depths is not None:
            return tuple(tuple(d) for d in cfg.stage_depths)
        return tuple((n,) for n in describe(cfg.model).blocks)

    def structure(self, cfg, input_channels: int) -> Structure:
        if input_channels != 3:
            raise ConfigError(f"torchvision models take 3 input channels, not {input_channels}",
                              path="input.channels")
        return describe(cfg.model)

    def weights_meta(self, cfg) -> dict:
        """For ``torchvision:ENUM``: the weights' evaluation normalisation and class names."""
        spec = cfg.weights or ""
        if not spec.startswith(WEIGHTS_PREFIX):
            return {}
        weights = _weights_enum(cfg.model, spec)
        view = weights.transforms()
        return {"source": spec, "mean": tuple(view.mean), "std": tuple(view.std),
                "categories": list(weights.meta.get("categories") or [])}

    def weights_file(self, cfg) -> Path | None:
        """``torchvision:ENUM`` -> torchvision's download cache (``TORCH_HOME``), fetched with
        its hash check when absent; a path -> None (used as it is)."""
        spec = cfg.weights or ""
        if not spec.startswith(WEIGHTS_PREFIX):
            return None
        weights = _weights_enum(cfg.model, spec)
        url = weights.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if path.is_file():
            return path
        prefix = HASH_SUFFIX.search(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), prefix and prefix.group(1),
                                           progress=False)
        except Exception as err:  # urllib / socket / hash errors: all mean "not here"
            why = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"backbone.weights {spec!r}: cannot download {url} ({why}); on a machine with a "
                f"network download it and copy it to {path}, or torch.save the model's "
                "state_dict() and set backbone.weights to that file") from None
        return path

    def build(self, space) -> Topology:
        topo = assemble(CUTS[space.backbone.model](_model(space.backbone.model, space.num_classes)))
        topo.structure = describe(space.backbone.model)
        return topo


FAMILIES.register("torchvision")(TorchvisionFamily())

__all__ = ["TorchvisionFamily", "CUTS", "describe", "assemble", "Final"]
