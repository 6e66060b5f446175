"""Fine-tune a searched architecture from its inherited weights, then re-fit its thresholds.

    result = finetune(RunDir("runs/q"), Arch.parse(ID), space=space, regime="mixed", epochs=5)

The start is the model the search scored: ``arch``'s sub-network of the trained supernet,
BatchNorm re-estimated for its depths (``Supernet.extract(arch, calib=calibration_batches(...))``,
:func:`~exitnas.retrain.inherited_model`). Then one phase of the regimes of
:mod:`exitnas.retrain` for ``epochs`` epochs:

- ``mixed``: phase 2, backbone and every exit head train; the inherited heads are kept (the
  regime's re-initialisation belongs to training from scratch, where phase 1 ran without them);
- ``disjoint``: phase 3, the exit heads only; the backbone gets no gradient and its BatchNorm
  layers stay in eval mode, so its tensors and BN buffers stay bit-identical.

``joint`` starts from scratch: that is ``exitnas retrain``. The loss, optimizer, seed and
channels_last are ``retrain``'s settings (``retrain.loss``, ``retrain.optim``, ...); weights
that are already trained usually want a lower learning rate than training from scratch
(``--set retrain.optim.lr=0.01``).

**Calibration, then thresholds.** After training, ``policy.calibration`` is fitted on val
(:mod:`exitnas.calibration`: with ``temperature``, one T_k per exit) and the model's exit
statistics are divided by it from then on; then the exit thresholds are fitted on val
(:func:`~exitnas.thresholds.fit_thresholds`) for the cost the inherited model has: the budget
is the inherited model's expected cost on val with ``arch``'s own thresholds (in the space's
cost unit; arch.json's keys name it: ``budget_macs``, ``expected_ms``). So the fine-tuned
model keeps the cost target the search scored ``arch`` at (a searched arch's thresholds were
fitted for the search budget, and its expected cost is at most that) and is compared with the
inherited one at equal cost. Statistics for fitting are computed on the CPU, as the export and
its runtime compute them, and calibrated: the thresholds are fitted on the statistics the
export will decide on (the inherited model's budget is its uncalibrated cost, what the search
scored). A policy whose thresholds are not fitted (``Policy.fitted`` false: ``patience``)
keeps ``arch``'s parameters.

Outputs: ``RUN/finetune/<structure id>/<regime>/{model.safetensors, calibration.json,
arch.json, metrics.csv, checkpoint.pt}`` (``calibration.json``: the T_k, bound to the
weights' sha256; arch.json's ``calibration`` repeats what the thresholds were fitted with); the structure id is the arch id without its thresholds
(``d2.2~s0b1=conv~max_softmax``), since the trained weights do not depend on them. arch.json
holds the fitted arch (``exitnas export RUN --arch arch.json --weights model.safetensors``), its
val accuracy and expected cost, and the inherited model's. A killed run resumes from its last
epoch with the weights of an uninterrupted one; a checkpoint of another structure, regime,
space, supernet or settings is refused. Rerunning a finished run writes nothing, except that an
arch of the same structure with other thresholds (another budget) re-fits arch.json, and
another ``policy.calibration`` re-fits calibration.json and arch.json (the weights stay).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import calibration
from ._config import to_dict
from .arch import Arch
from .data import Splits, batches, load_splits
from .errors import ConfigError
from .evaluate import ArchStats
from .io import atomic_write_json, save_weights
from .loop import Dist, LoopSpec, default_device, open_checkpoint, per_rank_batch, run_loop
from .losses import loss_from_config
from .model import MultiExitModel
from .retrain import (exit_accuracy_row, inherited_model, regime_phase, set_phase,
                      supernet_weights)
from .rundir import RunDir
from .space import Space

FINETUNE_PHASES = {"mixed": 2, "disjoint": 3}  # regime -> the phase that continues it


def structure_id(arch: Arch) -> str:
    """``arch``'s id without its thresholds: depths, exits and policy."""
    return arch.id.rsplit("=", 1)[0]


def finetune_dir(run_dir: RunDir, arch: Arch, regime: str) -> Path:
    return run_dir.path / "finetune" / structure_id(arch) / regime


@dataclass(frozen=True)
class FinetuneResult:
    out: Path
    model: MultiExitModel  # eval mode, on the CPU
    arch: Arch             # with the fitted thresholds
    regime: str
    manifest: dict         # what arch.json holds
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def finetune_settings(space: Space, epochs: int, supernet: Path) -> dict:
    """What shapes a fine-tuning run; a checkpoint made with other values is not resumed."""
    from .runtime import sha256_file

    cfg = to_dict(space.retrain)
    keep = ("loss", "loss_temperature", "loss_weight", "optim", "seed", "channels_last")
    return {"finetune": {"epochs": epochs, **{k: cfg[k] for k in keep}},
            "data": to_dict(space.data), "supernet_sha256": sha256_file(supernet),
            "bn_calib": {"batches": space.supernet.bn_calib_batches,
                         "seed": space.supernet.seed}}


def _val_batches(space: Space, splits: Splits):
    return batches(splits.val, batch_size=space.data.eval_batch_size, mean=splits.mean,
                   std=splits.std)


def val_stats(model: MultiExitModel, arch: Arch, space: Space, splits: Splits) -> ArchStats:
    """``model``'s exit statistics on val (CPU, ``data.eval_batch_size``; divided by the
    model's temperatures) with ``arch``'s costs."""
    from .cost import cost_table

    return ArchStats.from_model(model, _val_batches(space, splits), costs=cost_table(space),
                                arch=arch)


def fit_arch(stats: ArchStats, arch: Arch, space: Space, budget: float) -> tuple[Arch, dict]:
    """``arch`` with thresholds fitted on ``stats`` for ``budget`` (``stats.unit``; policies
    without fitting keep theirs), and what they score (``expected_<unit>``)."""
    from .policy import get_policy
    from .thresholds import fit_thresholds

    rule = get_policy(arch.policy)
    if not rule.fitted:
        s = stats.score(arch.policy, arch.thresholds)
        return arch, {"fitted": False, "accuracy": s.accuracy,
                      stats.unit.name("expected"): s.expected_cost}
    fit = fit_thresholds(stats, budget=budget, policy=arch.policy,
                         value_range=rule.param_range(space.policy))
    return arch.with_thresholds(fit.thresholds), {
        "fitted": True, "start": fit.start, "feasible": fit.feasible, "accuracy": fit.accuracy,
        stats.unit.name("expected"): fit.expected_cost}


def _check(arch: Arch, space: Space, regime: str, epochs: int) -> None:
    arch.validate(space)
    if regime not in FINETUNE_PHASES:
        raise ConfigError(f"regime {regime!r} does not fine-tune (known: "
                          f"{', '.join(FINETUNE_PHASES)}); joint trains from scratch: "
                          "`exitnas retrain`", file="--regime")
    if not 1 <= epochs <= 100_000:
        raise ConfigError(f"{epochs} is not in 1..100000", file="--epochs")


def finetune(run_dir: RunDir, arch: Arch, *, space: Space, regime: str,
             epochs: int | None = None, dist: Dist | None = None, resume: bool = False,
             restart: bool = False, splits: Splits | None = None,
             log: Callable[[str], None] | None = print) -> FinetuneResult:
    """Fine-tune ``arch`` from the supernet's weights with ``regime`` (``mixed`` or
    ``disjoint``) for ``epochs`` epochs (default ``retrain.epochs``), then fit its thresholds
    (module docs)."""
    dist = dist or Dist(device=default_device())
    epochs = space.retrain.epochs if epochs is None else epochs
    _check(arch, space, regime, epochs)
    cfg = space.retrain
    loss = loss_from_config(cfg)
    loss.check(regime=regime, space=space)
    per_rank_batch(space.data.batch_size, dist)
    weights = supernet_weights(run_dir)
    out = finetune_dir(run_dir, arch, regime)
    identity = {"kind": "finetune", "space": space.name, "fingerprint": space.fingerprint,
                "arch": structure_id(arch), "regime": regime}
    settings = finetune_settings(space, epochs, weights)
    state = open_checkpoint(out / "checkpoint.pt", identity=identity, settings=settings,
                            resume=resume, restart=restart)
    splits = splits or load_splits(space)
    loss.prepare(space=space, splits=splits)
    model = inherited_model(run_dir, space, arch, splits)
    inherited = val_stats(model, arch, space, splits)
    unit = inherited.unit
    s = inherited.score(arch.policy, arch.thresholds)
    before = {"arch": arch.id, "accuracy": s.accuracy, unit.name("expected"): s.expected_cost}
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    phase = regime_phase(model, FINETUNE_PHASES[regime], epochs=epochs, optim=cfg.optim,
                         loss=loss)
    spec = LoopSpec(name=f"finetune {regime}", title="fine-tuning",
                    done_text="already fine-tuned", identity=identity, settings=settings,
                    out=out, model=model, phases=(phase,),
                    evaluate=lambda: exit_accuracy_row(model, splits, space, dist.device),
                    seed=cfg.seed, final=out / "model.safetensors",
                    channels_last=cfg.channels_last)
    result = run_loop(spec, state, space=space, splits=splits, dist=dist, log=log)
    set_phase(model, 2)  # every parameter trainable again for whoever uses the model next
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    cal, reused = calibration.reuse_or_fit(model, out / "model.safetensors",
                                           space.policy.calibration,
                                           lambda: _val_batches(space, splits),
                                           reuse=result.finished_before)
    model.set_temperatures(cal.temperatures)  # the thresholds are fitted on these statistics
    manifest = _manifest_if_same(out, arch, unit, cal) if result.finished_before else None
    refit = manifest is None
    if refit:
        budget = before[unit.name("expected")]
        fitted, after = fit_arch(val_stats(model, arch, space, splits), arch, space, budget)
        manifest = {"arch": fitted.to_json(), "space": space.name,
                    "fingerprint": space.fingerprint, "regime": regime, "epochs": epochs,
                    "loss": cfg.loss, "exit_names": model.exit_names, "cost_unit": unit.key,
                    unit.name("budget"): budget, "calibration": cal.to_json(), "val": after,
                    "inherited": before}
    if dist.is_main:
        _write(out, model, manifest, weights=not result.finished_before,
               fitted=None if reused else cal, arch_json=refit)
        if result.finished_before and refit and log:
            log(f"thresholds re-fitted for the expected cost of {arch.id}: {out}/arch.json")
    dist.barrier()
    return FinetuneResult(out, model, Arch.from_json(manifest["arch"]), regime, manifest,
                          result.history, result.resumed_from)


def _write(out: Path, model: MultiExitModel, manifest: dict, *, weights: bool,
           fitted: "calibration.Fitted | None", arch_json: bool) -> None:
    """Weights, then calibration.json (``fitted``, bound to their sha256), then arch.json:
    each only when asked for."""
    if weights:
        save_weights(out / "model.safetensors", model.state_dict(), {
            "space": manifest["space"], "fingerprint": manifest["fingerprint"],
            "arch": manifest["arch"]["id"], "regime": manifest["regime"], "kind": "finetune"})
    if fitted is not None:
        calibration.store(out / "model.safetensors", fitted)
    if arch_json:
        atomic_write_json(out / "arch.json", manifest)


def _manifest_if_same(out: Path, arch: Arch, unit, cal: "calibration.Fitted") -> dict | None:
    """The arch.json of a finished run when it was fitted for ``arch`` (same budget, same
    cost unit) on statistics of the same calibration (older files: none, T_k = 1)."""
    try:
        manifest = json.loads((out / "arch.json").read_text())
    except (OSError, ValueError):
        return None
    inherited = manifest.get("inherited") if isinstance(manifest, dict) else None
    old = manifest.get("calibration") if isinstance(manifest, dict) else None
    old = old if isinstance(old, dict) else {"method": "none",
                                             "temperatures": [1.0] * len(cal.temperatures)}
    same = isinstance(inherited, dict) and inherited.get("arch") == arch.id \
        and manifest.get("cost_unit", "macs") == unit.key \
        and (old.get("method"), old.get("temperatures")) == (cal.method, list(cal.temperatures))
    return manifest if same else None


__all__ = ["finetune", "FinetuneResult", "finetune_dir", "structure_id", "fit_arch",
           "val_stats", "FINETUNE_PHASES"]
