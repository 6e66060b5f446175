"""Costs per segment, summed: the cost-model registry and its default, fvcore MACs.

A cost model (``cost.model`` in a space; :data:`COST_MODELS`) turns a space into a
:class:`CostTable`: the cost of every segment (stem, each block at each position, each
candidate head at each position, the final head) in one :class:`~exitnas.units.Unit`. Built in:
``fvcore_macs`` (here; exact integer MACs), ``latency`` (:mod:`exitnas.latency`: milliseconds
measured with the runtime backend deployed on) and ``table`` (:mod:`exitnas.cost_csv`: a CSV of
per-segment costs measured on the target device). Add one with
``@COST_MODELS.register("name")`` on a :class:`CostModel` subclass.

What ``fvcore_macs`` counts (one input image of the space's size, eval mode):
- fvcore's defaults: convolutions and linear layers (one fused multiply-add = 1 MAC),
  BatchNorm (2 per input element in eval mode with its affine weights, as fvcore counts it),
  LayerNorm (5 per input element, fvcore's rule), adaptive average pooling (1 per input
  element);
- added here, because fvcore leaves them uncounted: max pooling and adaptive max pooling
  (1 per input element, the same rule fvcore uses for average pooling) and element-wise
  add / sub / mul and sigmoid (1 per output element: residual adds, SDN's mixed pooling and
  its mixing weight, squeeze-excitation's channel scaling, ConvNeXt's layer scale);
  hardsigmoid as sigmoid (1 per output element: MobileNetV3's squeeze-excitation gate, on
  one value per channel);
- not counted: activations (ReLU, ReLU6, hardswish, SiLU, GELU: no multiply-add, and
  neither fvcore nor torchvision's published figures count them; at 1 per element they would
  add 1.7 % to MobileNetV3-Small and 2.9 % to EfficientNet-B0), dropout and stochastic depth
  (identities in eval mode; torchvision's StochasticDepth returns its input and traces to
  nothing), flatten, padding, permute / reshape / view.
- BatchNorm of a family whose ``batchnorm_folded`` is true (``torchvision``): a BatchNorm
  whose input is a convolution's output counts 0, folded into that convolution as inference
  runtimes do (fvcore's own note: "ignore BN flops due to inference-time fusion"); any other
  BatchNorm as above. torchvision's published GFLOPS count convolutions and linear layers
  only, and BatchNorm at fvcore's rule is 2-5 % of a MobileNet's or EfficientNet's MACs, so
  counting it would put those models outside 1.5 % of the figures users know. The
  ``resnet`` / ``mobilenetv2`` families count BatchNorm (their costs predate this rule).

Segments are counted separately (stem, each block at each position, each head at each
position, the final head) and summed. Whole early-exit models are never traced at once:
fvcore's tracer drops heads whose output only feeds control flow.

C_k, the cost of leaving at exit k, is the backbone up to exit k plus every head evaluated on
the way, including exit k's. A sample that exits nowhere pays the final exit's C. The plain
backbone is every block at maximum depth plus the final head only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from math import prod
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ConfigError
from .registry import Registry
from .units import MACS, Unit

if TYPE_CHECKING:  # space.py imports this module to register the built-in cost models
    from .arch import Arch
    from .space import Space


def _count_input(inputs, outputs) -> int:
    return prod(inputs[0].type().sizes())


def _count_output(inputs, outputs) -> int:
    return prod(outputs[0].type().sizes())


EXTRA_HANDLES = {
    "aten::max_pool2d": _count_input,
    "aten::adaptive_max_pool2d": _count_input,
    "aten::add": _count_output,
    "aten::add_": _count_output,
    "aten::sub": _count_output,
    "aten::rsub": _count_output,
    "aten::mul": _count_output,
    "aten::mul_": _count_output,
    "aten::sigmoid": _count_output,
    "aten::hardsigmoid": _count_output,
    "aten::hardsigmoid_": _count_output,
}

# Ops that cost nothing (module docs): activations and eval-mode identities that fvcore does not
# already ignore, by exact name.
FREE_OPS = frozenset({"aten::hardswish", "aten::hardswish_", "aten::silu", "aten::silu_",
                      "aten::gelu", "aten::dropout_"})


def _batch_norm_folded(inputs, outputs) -> int:
    """0 for a BatchNorm fed by a convolution (folded into it), else fvcore's count."""
    if inputs[0].node().kind() == "aten::_convolution":
        return 0
    from fvcore.nn.jit_handles import batchnorm_flop_jit

    return int(batchnorm_flop_jit(inputs, outputs))


def count_macs(module: nn.Module, shape: tuple[int, ...], *, fold_batchnorm: bool = False) -> int:
    """fvcore MACs of ``module`` on one zero input of ``shape`` (C, H, W), eval mode, with the
    handlers above; ``fold_batchnorm``: a BatchNorm after a convolution counts 0. Raises if
    fvcore meets an op it cannot count (other than those the module docs list as free)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        was_training = module.training
        module.eval()
        try:
            analysis = FlopCountAnalysis(module, torch.zeros(1, *shape))
            analysis.set_op_handle(**EXTRA_HANDLES)
            if fold_batchnorm:
                analysis.set_op_handle("aten::batch_norm", _batch_norm_folded)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = int(analysis.total())
            unknown = {k for k in analysis.unsupported_ops()
                       if k not in FREE_OPS and not _ignorable(k)}
        finally:
            module.train(was_training)
    if unknown:
        raise RuntimeError(f"fvcore cannot count ops {sorted(unknown)} in {type(module).__name__}")
    return total


def _ignorable(op: str) -> bool:
    return any(w in op for w in ("relu", "hardtanh", "flatten", "clamp", "constant_pad", "view",
                                 "reshape", "size", "detach"))


@dataclass(frozen=True, kw_only=True)
class CostTable:
    """Per-segment costs of a space at its input size, per image, in ``unit`` (fvcore MACs of
    one image; ``latency``: ms per image at the measured batch size)."""

    unit: Unit
    stem: float
    blocks: dict[tuple[int, int], float]           # (stage, block) -> cost
    heads: dict[tuple[int, int, str], float]       # (stage, block, head) -> cost
    final: float
    counted: str = ""                               # what was counted / measured, for manifests

    def exit_costs(self, arch: Arch) -> list[float]:
        """C_k for every exit of ``arch``, the final exit last."""
        costs, head_total = [], 0
        marks = {e.position: self.heads[(e.stage, e.block, e.head)] for e in arch.exits}
        backbone = self.stem
        for s, d in enumerate(arch.depths):
            for b in range(d):
                backbone += self.blocks[(s, b)]
                if (s, b) in marks:
                    head_total += marks[(s, b)]
                    costs.append(backbone + head_total)
        costs.append(backbone + head_total + self.final)
        return costs

    def path_cost(self, arch: Arch) -> float:
        """Worst case: a sample that runs every exit (= C of the final exit)."""
        return self.exit_costs(arch)[-1]

    def backbone(self, depths: tuple[int, ...] | None = None) -> float:
        """The plain backbone at ``depths`` (default: max): blocks + final head, no exits."""
        depths = depths or tuple(1 + max(b for (s2, b) in self.blocks if s2 == s)
                                 for s in sorted({s for s, _ in self.blocks}))
        return self.stem + sum(self.blocks[(s, b)] for s, d in enumerate(depths)
                               for b in range(d)) + self.final

    def expected_cost(self, arch: Arch, exit_fractions) -> float:
        """Σ_k fraction_k × C_k."""
        return float(sum(f * c for f, c in zip(exit_fractions, self.exit_costs(arch))))

    def to_json(self) -> dict:
        key = self.unit.key
        return {"unit": key, "counted": self.counted, "stem": self.stem, "final": self.final,
                "blocks": [{"stage": s, "block": b, key: m} for (s, b), m in sorted(self.blocks.items())],
                "heads": [{"stage": s, "block": b, "head": h, key: m}
                          for (s, b, h), m in sorted(self.heads.items())]}


COUNTED_MACS = ("fvcore MACs at batch 1 (one multiply-add = 1), per segment; C_k = backbone up "
                "to exit k + every head evaluated on the way")


def build_cost_table(net: nn.Module) -> CostTable:
    """Count every segment of a :class:`~exitnas.supernet.Supernet` separately: its walk at
    full depth gives each block's input, and each candidate head is counted on its
    position's output. BatchNorm is folded where the space's family says so (module docs)."""
    space: Space = net.space
    shape = (space.input.channels, space.input.size, space.input.size)
    count = partial(count_macs, fold_batchnorm=space.family.batchnorm_folded)
    stem = count(net.stem, shape)
    blocks, feat_shapes = {}, {}
    was = net.training
    net.eval()
    with torch.no_grad():
        x = net.stem(torch.zeros(1, *shape))
        for pos, block in net.walk(space.max_depths):
            blocks[pos] = count(block, tuple(x.shape[1:]))
            x = block(x)
            feat_shapes[pos] = tuple(x.shape[1:])
    net.train(was)
    heads = {(e.stage, e.block, e.head): count(net.heads[e.key], feat_shapes[e.position])
             for e in net.candidate_exits(space.max_depths)}
    final = count(net.final, tuple(x.shape[1:]))
    return CostTable(unit=MACS, stem=stem, blocks=blocks, heads=heads, final=final,
                     counted=COUNTED_MACS)


def backbone_params(net: nn.Module) -> int:
    """Parameters of a supernet's backbone: stem, blocks and final head, no exit heads (for a
    torchvision family, the torchvision model's own count)."""
    return sum(p.numel() for m in (net.stem, net.stages, net.final) for p in m.parameters())


class CostModel:
    """A registry entry: :meth:`table` builds the cost table of a space in the entry's unit
    (its ``cost`` section holds the entry's settings; weights never change a cost, so a fresh
    supernet is measured)."""

    def check(self, cfg) -> None:
        """Raise a ConfigError (``path``: the field in the ``cost`` section) when ``cfg``'s
        settings do not suit this model."""
        if cfg.table is not None:
            raise ConfigError(f"a table is read by cost.model 'table', not {cfg.model!r}",
                              path="table")

    def table(self, space: Space) -> CostTable:
        raise NotImplementedError


COST_MODELS: Registry[CostModel] = Registry("cost model")


@COST_MODELS.register("fvcore_macs")
class FvcoreMacs(CostModel):
    """fvcore MACs per segment, with the rules of the module docs (exact integers)."""

    def table(self, space: Space) -> CostTable:
        return mac_table(space)


def mac_table(space: Space) -> CostTable:
    """fvcore MACs of ``space`` whatever its cost model (the export's ``macs`` fields); one
    count per network, whatever the ``cost`` section says."""
    import dataclasses

    return _mac_table(dataclasses.replace(space, cost=type(space.cost)()))


@lru_cache(maxsize=8)
def _mac_table(space: Space) -> CostTable:
    from .supernet import Supernet

    return build_cost_table(Supernet(space, pretrained=False))


@lru_cache(maxsize=8)
def cost_table(space: Space) -> CostTable:
    """The cost table of ``space`` by its cost model (``cost.model``)."""
    return cost_model(space).table(space)


def cost_model(space: Space) -> CostModel:
    return COST_MODELS.get(space.cost.model)()


def model_segment_macs(model: nn.Module, shape: tuple[int, ...], *,
                       fold_batchnorm: bool = False) -> list[int]:
    """Direct fvcore count of an extracted model, segment by segment: C_k per exit
    (``fold_batchnorm`` as in :func:`count_macs`: the space family's ``batchnorm_folded``)."""
    costs, total, heads = [], 0, 0
    x = torch.zeros(1, *shape)
    model.eval()
    with torch.no_grad():
        for segment, head in zip(model.segments, model.heads):
            total += count_macs(segment, tuple(x.shape[1:]), fold_batchnorm=fold_batchnorm)
            x = segment(x)
            heads += count_macs(head, tuple(x.shape[1:]), fold_batchnorm=fold_batchnorm)
            costs.append(total + heads)
    return costs
