"""Search spaces: a YAML file -> a frozen, validated :class:`Space`.

A space names a backbone family and its stages (allowed depths per stage), the candidate exit
positions, the allowed head designs, the exit policies and their threshold ranges, and the
settings of the later pipeline steps (data, supernet training, search, retrain).

    >>> space = load_space("search_spaces/resnet_cifar.yaml")
    >>> space.positions()[:2]
    [(0, 0), (0, 1)]

A position ``(stage, block)`` means "after block ``block`` of stage ``stage``" (0-based).
Every error names the file and the field path, e.g. ``stages[2].depths: 0 is not >= 1``.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from . import blocks, calibration, cost, cost_csv, data, heads, latency, losses, policy, topology, tv_family  # noqa: F401 (registers)
from . import units
from ._config import field, from_dict, read_yaml, to_dict, with_overrides
from .errors import ConfigError

Position = tuple[int, int]
SEED_MAX = 2**32 - 1  # numpy's and Optuna's samplers take 32-bit seeds
EPOCHS_MAX = 100_000


@dataclass(frozen=True, kw_only=True)
class InputConfig:
    channels: int = field(3, ge=1, le=64, doc="image channels")
    size: int = field(32, ge=4, le=4096, doc="square input side in pixels; costs are counted at this size")


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    channels: int = field(ge=1, le=8192, doc="block width (bottleneck: inner width; output is 4x)")
    stride: int = field(1, choices=(1, 2), doc="stride of the stage's first block")
    depths: tuple[int, ...] = field(nonempty=True, ge=1, le=512, doc="allowed numbers of blocks")
    expand_ratio: int = field(6, ge=1, le=64, doc="inverted_residual / ghost_bottleneck expansion factor (hidden width = input width x this)")
    kernel: int | None = field(None, choices=(3, 5, 7), doc="ghost_bottleneck: kernel of the depthwise convs of a stride-2 block and its shortcut (default 3)")
    se: float | None = field(None, gt=0.0, le=1.0, doc="ghost_bottleneck: squeeze-excitation ratio (GhostNet: 0.25; default none)")

    def __post_init__(self) -> None:
        if list(self.depths) != sorted(set(self.depths)):
            raise ConfigError(f"must be strictly increasing, got {list(self.depths)}", path="depths")


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """The ``backbone`` section; its family (``topology.FAMILIES``) checks which fields it
    needs: ``resnet`` / ``mobilenetv2`` build from ``block`` and ``stages``; ``torchvision``
    takes ``model`` and optional ``stage_depths``."""

    family: str = field(choices=topology.FAMILIES, doc="backbone family: resnet, mobilenetv2 (built from stages) or torchvision (a torchvision model)")
    block: str | None = field(None, choices=blocks.BLOCKS, doc="resnet / mobilenetv2: block registry name: basic, bottleneck (resnet), inverted_residual, ghost_bottleneck (mobilenetv2)")
    stem: Literal["cifar", "imagenet"] = field("cifar", doc="resnet / mobilenetv2: cifar: 3x3 s1; imagenet: 7x7 s2 + max-pool")
    stem_channels: int = field(16, ge=1, le=8192, doc="resnet / mobilenetv2: output width of the stem")
    stages: tuple[StageConfig, ...] | None = field(None, nonempty=True, doc="resnet / mobilenetv2: one entry per stage, in order")
    final_head: str = field("linear", choices=heads.HEADS, doc="resnet / mobilenetv2: head of the final exit")
    final_channels: int | None = field(None, ge=1, le=65536, doc="resnet / mobilenetv2: 1x1 conv width before the final head")
    model: str | None = field(None, doc="torchvision: the model builder's name (resnet50, mobilenet_v3_large, ...)")
    stage_depths: tuple[tuple[int, ...], ...] | None = field(
        None, doc="torchvision: allowed depths per stage (strictly increasing; blocks past a "
                  "depth must have identity shortcuts); default: every stage at full depth")
    weights: str | None = field(None, doc="trained backbone weights: a safetensors file in "
                                          "exitnas's names (train-backbone's), or for torchvision "
                                          "a torchvision state dict (.pth read with "
                                          "weights_only, or .safetensors) or "
                                          "torchvision:ENUM (e.g. torchvision:IMAGENET1K_V2); "
                                          "default: RUN/backbone/weights.safetensors")

    def __post_init__(self) -> None:
        topology.FAMILIES.get(self.family).check(self)


@dataclass(frozen=True, kw_only=True)
class ExitsConfig:
    positions: str | tuple[tuple[int, int], ...] = field(
        "all", doc="'all' or a list of [stage, block] pairs after which an exit may sit")
    heads: tuple[str, ...] = field(("linear",), nonempty=True, choices=heads.HEADS,
                                   doc="head designs the search may place (heads registry)")
    head_width: int = field(256, ge=1, le=65536, doc="widest hidden layer of an exit head: "
                            "conv and mlp heads use min(C, head_width) channels on C-channel "
                            "features (costed as built)")
    max_exits: int = field(4, ge=1, le=4096, doc="most early exits (the final exit not counted)")
    min_exits: int = field(1, ge=0, le=4096, doc="fewest early exits")

    def __post_init__(self) -> None:
        if isinstance(self.positions, str) and self.positions != "all":
            raise ConfigError(f"expected 'all' or a list of [stage, block], got {self.positions!r}",
                              path="positions")
        if self.min_exits > self.max_exits:
            raise ConfigError(f"{self.min_exits} is more than max_exits {self.max_exits}",
                              path="min_exits")


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """The ``policy`` section, read through the policy registry: ``names``, one
    ``[low, high]`` key per registered policy's parameters (:class:`exitnas.policy.Param`;
    ``threshold_range``, ``entropy_range`` and ``patience_range`` for the built-in ones) and
    ``calibration`` (:data:`exitnas.calibration.CALIBRATIONS`). Its fields are those of
    :meth:`config_schema`, the subclass made from the registry."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name not in _POLICY_KEYS:
                lo, hi = getattr(self, f.name)
                if lo > hi:
                    raise ConfigError(f"low end {lo} is above high end {hi}", path=f.name)

    @classmethod
    def config_schema(cls) -> type["PolicyConfig"]:
        """The dataclass the section is read with (``_config.from_dict`` asks for it)."""
        reg = policy.POLICIES
        return _policy_schema(tuple((n, reg.get(n)) for n in reg.in_order()))

    def __reduce__(self):  # the schema class is made at run time: pickle the values
        return _read_policy, (to_dict(self),)


def _read_policy(data: dict) -> PolicyConfig:
    return from_dict(PolicyConfig, data)


_POLICY_KEYS = ("names", "calibration")  # the policy section's keys that are not ranges


@functools.lru_cache(maxsize=16)
def _policy_schema(registered: tuple) -> type[PolicyConfig]:
    """``names``, every registered policy's key in registration order, then ``calibration``."""
    doc = f"exit policies the search may pick: {', '.join(n for n, _ in registered)}"
    fields = [("names", tuple[str, ...], field(("max_softmax",), nonempty=True,
                                               choices=policy.POLICIES, doc=doc))]
    for _, cls in registered:
        p = cls.param
        if p.key not in (f[0] for f in fields):
            bounds = {k: v for k, v in (("ge", p.ge), ("le", p.le)) if v is not None}
            kind = tuple[int, int] if p.integer else tuple[float, float]
            fields.append((p.key, kind, field(p.default, doc=p.doc, **bounds)))
    fields.append(("calibration", str, field("none", choices=calibration.CALIBRATIONS,
                                             doc=calibration.space_doc())))
    return dataclasses.make_dataclass(
        "PolicyConfig", fields, bases=(PolicyConfig,), frozen=True, kw_only=True,
        namespace={"__module__": __name__, "__doc__": PolicyConfig.__doc__})


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str = field("digits", choices=data.DATASETS, doc=data.dataset_doc())
    root: str | None = field(None, doc="dataset folder (cifar*: torchvision root; imagefolder: "
                                       "holds train/ and test/)")
    download: bool = field(False, doc="let torchvision download CIFAR")
    val_fraction: float = field(0.1, gt=0.0, lt=1.0, doc="held out of train, never augmented")
    split_seed: int = field(0, ge=0, le=SEED_MAX, doc="seed of the train/val split")
    mean: tuple[float, ...] | None = field(None, doc="per-channel normalisation (default: measured on train; streamed: on 512 sampled train images)")
    std: tuple[float, ...] | None = field(None, gt=0.0, doc="per-channel std (dataset default)")
    augment: bool = field(True, doc="augment train: in memory random crop (pad size/8) + horizontal flip; streamed RandomResizedCrop(input.size) + horizontal flip")
    batch_size: int = field(128, ge=1, le=2**20, doc="training batch (per process)")
    eval_batch_size: int = field(512, ge=1, le=2**20, doc="batch for caching and evaluation")
    num_workers: int = field(0, ge=0, le=1024, doc="DataLoader worker processes of a streamed set (0: read in the training process); in-memory sets need none")
    loader: Literal["auto", "memory", "stream"] = field(
        "auto", doc="memory: decode every image into RAM once; stream: read image files per batch "
                    "(torch DataLoader; train RandomResizedCrop + flip, val / test / BN "
                    "calibration Resize(round(input.size / 0.875)) + CenterCrop(input.size)); "
                    "only imagefolder streams; auto: stream an imagefolder above "
                    "data.stream_threshold, else memory")
    stream_threshold: int = field(2**31, ge=0, le=2**62, doc="auto streams an imagefolder whose decoded train + test images (files x input.channels x input.size^2 bytes) exceed this many bytes (default 2 GiB)")
    train_subset: int | None = field(None, ge=1, le=2**40, doc="use only this many train images")
    test_subset: int | None = field(None, ge=1, le=2**40, doc="use only this many test images (a random subset, seed data.split_seed)")
    synthetic_size: int = field(512, ge=16, le=2**20, doc="images in the synthetic set")
    unlabelled: str | None = field(None, doc="folder of unlabelled images (its files and its subfolders' files, opened like imagefolder's; labels ignored) that retrain.loss label_free trains the heads on")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    optimizer: Literal["sgd", "adamw"] = field("sgd", doc="sgd (momentum) or adamw")
    lr: float = field(0.1, gt=0.0, doc="peak learning rate")
    momentum: float = field(0.9, ge=0.0, lt=1.0, doc="SGD momentum")
    nesterov: bool = field(True, doc="Nesterov momentum (sgd)")
    weight_decay: float = field(5e-4, ge=0.0, doc="L2 / decoupled weight decay")
    schedule: Literal["cosine", "constant"] = field("cosine", doc="learning-rate schedule over epochs")
    warmup_epochs: int = field(0, ge=0, le=EPOCHS_MAX, doc="linear warm-up epochs")


@dataclass(frozen=True, kw_only=True)
class BackboneTrainingConfig:
    epochs: int = field(30, ge=1, le=EPOCHS_MAX, doc="epochs of the full-depth backbone with its final exit only (stage 0)")
    optim: OptimConfig = field(OptimConfig(), doc="optimizer settings")
    label_smoothing: float = field(0.0, ge=0.0, lt=1.0, doc="label smoothing of the cross-entropy")
    seed: int = field(0, ge=0, le=SEED_MAX, doc="training seed (initial weights and data order)")
    channels_last: bool = field(False, doc="channels_last memory format (faster on CPU)")


@dataclass(frozen=True, kw_only=True)
class SupernetConfig:
    epochs: int = field(10, ge=1, le=EPOCHS_MAX, doc="supernet training epochs")
    optim: OptimConfig = field(OptimConfig(), doc="optimizer settings")
    random_subnets: int = field(2, ge=0, le=1024, doc="random sub-networks per step (sandwich rule)")
    distill: bool = field(True, doc="in-place distillation from the largest net's final exit")
    distill_temperature: float = field(1.0, gt=0.0, doc="temperature of in-place distillation")
    bn_calib_batches: int = field(10, ge=1, le=2**20, doc="train batches to re-estimate BN statistics")
    seed: int = field(0, ge=0, le=SEED_MAX, doc="training seed")
    channels_last: bool = field(False, doc="channels_last memory format (faster on CPU)")
    init: Literal["backbone", "scratch"] = field(
        "backbone", doc="backbone: grow the supernet from the trained backbone (backbone.weights, "
                        "else RUN/backbone/); scratch: random initial weights")
    heads: Literal["detached", "sampled"] = field(
        "detached", doc="detached: every candidate head learns on detached features; sampled: "
                        "per sub-network one sampled exit set (<= exits.max_exits) also trains "
                        "the backbone. disjoint = backbone + detached, mixed = backbone + "
                        "sampled, joint = scratch + sampled")
    loss: str = field("sandwich", choices=losses.SUPERNET_LOSSES,
                      doc="how a sandwich pass combines its exits' losses (losses.SUPERNET_LOSSES)")
    teacher: Literal["largest", "backbone"] = field(
        "largest", doc="largest: the largest net learns from the labels, the others distil from "
                       "its final exit (in-place); backbone: every pass learns from the labels "
                       "plus distillation from the frozen trained backbone (OFA's teacher; needs "
                       "init backbone and distill)")

    def __post_init__(self) -> None:
        if self.teacher == "backbone" and (self.init != "backbone" or not self.distill):
            raise ConfigError("the backbone teacher needs supernet.init 'backbone' and "
                              "supernet.distill true", path="teacher")


@dataclass(frozen=True, kw_only=True)
class CostConfig:
    """The ``cost`` section: which cost model scores every architecture (exitnas.cost) and
    its settings; budgets, tables and exports are in its unit."""

    model: str = field("fvcore_macs", choices=cost.COST_MODELS,
                       doc="cost model (registry): fvcore_macs (MACs), latency (ms per image, "
                           "measured with the runtime backend), table (a CSV of per-segment "
                           "costs measured on the target device)")
    backend: Literal["pt2", "onnx"] = field(
        "pt2", doc="latency: the runtime backend measured (pt2 = torch.export, onnx = ONNX "
                   "Runtime)")
    batch: int = field(1, ge=1, le=4096, doc="latency: images per call measured; costs are ms "
                                             "per image at this batch size")
    threads: int = field(1, ge=1, le=1024, doc="latency: intra-op threads measured with")
    rounds: int = field(30, ge=3, le=10**5, doc="latency: timed rounds (median), all segments "
                                                "interleaved in each round")
    warmup: int = field(5, ge=0, le=10**5, doc="latency: untimed rounds first")
    table: str | None = field(None, doc="table: CSV file of per-segment costs (columns "
                                        "segment, stage, block, head, cost, unit)")

    def __post_init__(self) -> None:
        cost.COST_MODELS.get(self.model)().check(self)  # a ConfigError names the field


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    trials: int = field(200, ge=1, le=10**8, doc="completed trials the search reaches")
    sampler: Literal["nsga2", "random"] = field("nsga2", doc="NSGA-II or a random baseline")
    population_size: int = field(32, ge=2, le=10**6, doc="NSGA-II population")
    seed: int = field(0, ge=0, le=SEED_MAX, doc="sampler seed")
    budget_fraction: float | None = field(1.0, gt=0.0, doc="expected-cost budget / the plain "
                                                             "backbone's cost")
    budget: str | float | None = field(
        None, doc="absolute expected-cost budget in the cost model's unit, e.g. 20M (MACs) or "
                  "3.5ms; overrides budget_fraction")
    budget_macs: float | None = field(
        None, gt=0.0, doc="older spelling of search.budget in MACs (space files and run "
                          "directories made before cost models); prefer search.budget")
    max_path_fraction: float | None = field(None, gt=0.0, doc="worst-case path budget / the "
                                                              "backbone's cost")
    backend: Literal["optuna", "ray"] = field("optuna", doc="in-process Optuna or Ray Tune")
    storage: str | None = field(None, doc="SQLAlchemy URL or journal path (default: run dir)")
    workers: int = field(2, ge=1, le=2**16, doc="concurrent Ray trials")
    thresholds: Literal["fitted", "evolved"] = field(
        "fitted", doc="fitted: each candidate's exit thresholds are fitted on val for every "
                      "deploy budget (exitnas.thresholds); evolved: thresholds are genes")
    deploy_budgets: tuple[float | str, ...] | None = field(
        None, doc="expected-cost budgets to deploy at: fractions of the backbone's cost (<= 1) "
                  "or amounts in the cost model's unit (20M, 3.5ms), each <= the search budget; "
                  "the search maximises the mean val accuracy over them, thresholds fitted per "
                  "budget (default: the search budget)")


    def __post_init__(self) -> None:
        if self.budget is not None and self.budget_macs is not None:
            raise ConfigError("set search.budget or its older spelling search.budget_macs, "
                              "not both", path="budget_macs")
        problem = None if self.budget is None else units.amount_problem(self.budget)
        if problem:
            raise ConfigError(problem, path="budget")
        for i, v in enumerate(self.deploy_budgets or ()):
            problem = units.amount_problem(v)
            if problem:
                raise ConfigError(problem, path=f"deploy_budgets[{i}]")


@dataclass(frozen=True, kw_only=True)
class RetrainConfig:
    regime: Literal["joint", "disjoint", "mixed"] = field("mixed", doc="training regime (Kubaty et al.)")
    epochs: int = field(10, ge=1, le=EPOCHS_MAX, doc="total, split across phases")
    phase1_fraction: float = field(0.5, gt=0.0, lt=1.0, doc="share of epochs in phase 1")
    loss: str = field("mean_ce", choices=losses.LOSSES,
                      doc=f"exit loss (registry): {', '.join(losses.LOSSES.names())}")
    loss_temperature: float = field(3.0, gt=0.0, doc="distillation temperature")
    loss_weight: float = field(0.5, ge=0.0, le=1.0, doc="weight of the loss's second term: "
                               "distillation (distill), pairwise KL (synergy), ambiguity "
                               "penalty (neg_correlation)")
    optim: OptimConfig = field(OptimConfig(), doc="optimizer settings")
    init_from_supernet: bool = field(False, doc="start from the supernet's weights")
    phase1: Literal["train", "backbone"] = field(
        "train", doc="train: disjoint and mixed train their phase 1 here; backbone: phase 1 is "
                     "stage 0's trained backbone (backbone.weights, else RUN/backbone/), and "
                     "retrain.epochs counts the later phase only (SDN's IC-only recipe = "
                     "disjoint + backbone)")
    seed: int = field(0, ge=0, le=SEED_MAX, doc="training seed")
    channels_last: bool = field(False, doc="channels_last memory format")

    def __post_init__(self) -> None:
        if self.phase1 == "backbone" and self.init_from_supernet:
            raise ConfigError("retrain.phase1 'backbone' starts from the trained backbone, not "
                              "the supernet; set retrain.init_from_supernet=false",
                              path="phase1")


@dataclass(frozen=True, kw_only=True)
class Space:
    name: str = field(doc="used in run directories and exports")
    version: int = field(1, ge=1, le=10**9, doc="version of this space file")
    num_classes: int = field(ge=2, le=10**6, doc="classes of the dataset")
    input: InputConfig = field(InputConfig())
    backbone: BackboneConfig
    exits: ExitsConfig = field(ExitsConfig())
    policy: PolicyConfig = dataclasses.field(
        default_factory=lambda: PolicyConfig.config_schema()(), metadata={"doc": ""})
    data: DataConfig = field(DataConfig())
    backbone_training: BackboneTrainingConfig = field(BackboneTrainingConfig())
    supernet: SupernetConfig = field(SupernetConfig())
    cost: CostConfig = field(CostConfig())
    search: SearchConfig = field(SearchConfig())
    retrain: RetrainConfig = field(RetrainConfig())

    def __post_init__(self) -> None:
        self.family.structure(self.backbone, self.input.channels)  # raises for what it cannot build
        for name in ("mean", "std"):
            values = getattr(self.data, name)
            if values is not None and len(values) != self.input.channels:
                raise ConfigError(f"{len(values)} values for {self.input.channels} input channels",
                                  path=f"data.{name}")
        if isinstance(self.exits.positions, tuple):
            deepest = self.max_depths
            for i, (s, b) in enumerate(self.exits.positions):
                where = f"exits.positions[{i}]"
                if not 0 <= s < len(deepest):
                    raise ConfigError(f"stage {s} does not exist ({len(deepest)} stages)", path=where)
                if not 0 <= b < deepest[s]:
                    raise ConfigError(f"block {b} is beyond stage {s}'s deepest "
                                      f"{deepest[s]} blocks", path=where)
            if len(set(self.exits.positions)) != len(self.exits.positions):
                raise ConfigError("lists a position twice", path="exits.positions")
        if not self.positions():
            raise ConfigError("no candidate exit position fits before the final exit",
                              path="exits.positions")

    # ---- derived views -------------------------------------------------------------------
    @property
    def family(self) -> "topology.Family":
        return topology.FAMILIES.get(self.backbone.family)

    @functools.cached_property
    def stage_depths(self) -> tuple[tuple[int, ...], ...]:
        """Allowed depths per stage (from the backbone's family)."""
        return self.family.stage_depths(self.backbone)

    @property
    def max_depths(self) -> tuple[int, ...]:
        return tuple(max(d) for d in self.stage_depths)

    @property
    def min_depths(self) -> tuple[int, ...]:
        return tuple(min(d) for d in self.stage_depths)

    def depth_settings(self) -> list[tuple[int, ...]]:
        """Every depth setting of the space (product over stages)."""
        return list(itertools.product(*self.stage_depths))

    def positions(self, depths: tuple[int, ...] | None = None) -> list[Position]:
        """Candidate exit positions, in network order, active at ``depths`` (default: max).

        A position is active when its block runs and it is not the final block (the final
        exit sits there)."""
        depths = self.max_depths if depths is None else tuple(depths)
        last = len(depths) - 1
        if self.exits.positions == "all":
            cands = [(s, b) for s, d in enumerate(self.max_depths) for b in range(d)]
        else:
            cands = sorted(self.exits.positions)
        return [(s, b) for s, b in cands if b < depths[s] and not (s == last and b >= depths[s] - 1)]

    def to_dict(self) -> dict:
        return to_dict(self)

    def with_overrides(self, overrides: dict) -> "Space":
        return with_overrides(self, overrides)

    @property
    def fingerprint(self) -> str:
        """Hash of the parts that define the network (not data/training settings)."""
        import hashlib
        import json

        core = {k: to_dict(getattr(self, k)) for k in ("num_classes", "input", "backbone", "exits")}
        del core["backbone"]["weights"]  # where trained weights come from is not the network
        for stage in core["backbone"]["stages"] or ():
            for key in STAGE_KEYS_ADDED:
                if stage[key] is None:  # unset: the network every older space file meant
                    del stage[key]
        for (section, key), default in ADDED_SINCE_V1.items():
            if core[section][key] == default:  # the network every older space file meant
                del core[section][key]
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


# Network-defining keys added after run directories existed, with the value every older file
# meant: at that value they stay out of the fingerprint, so those runs still resume. (Older
# heads were uncapped: they differ from head_width 256 only on features wider than 256
# channels, where old weights then fail to load with a one-line shape error.)
ADDED_SINCE_V1 = {("backbone", "model"): None, ("backbone", "stage_depths"): None,
                  ("exits", "head_width"): 256}
STAGE_KEYS_ADDED = ("kernel", "se")  # per-stage keys added later, None (unset) in older files


def parse_space(data: object, *, file: str | None = None) -> Space:
    try:
        return from_dict(Space, data)
    except ConfigError as err:
        raise ConfigError(err.detail, file=file, path=err.path) from None


def load_space(path: str | Path, overrides: dict | None = None) -> Space:
    """Read a search-space YAML file (see :func:`~exitnas._config.read_yaml`) and validate it."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        raise ConfigError("file is empty", file=str(path))
    space = parse_space(data, file=str(path))
    if overrides:
        try:
            space = with_overrides(space, overrides)
        except ConfigError as err:
            raise ConfigError(err.detail, file="--set", path=err.path) from None
    return space


__all__ = ["Space", "StageConfig", "BackboneConfig", "load_space", "parse_space",
           "Position"]
