"""Per-exit calibration of the exit statistics (``policy.calibration``), fitted on val.

    cal = fit_calibration(model, "temperature", val_batches)   # -> Fitted, nothing changed
    model.set_temperatures(cal.temperatures)    # predict, from_model, the export divide by T_k
    store(out / "model.safetensors", cal)       # out/calibration.json, bound to those weights

**Temperature scaling** (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017),
per exit as early-exit work applies it (Kubaty, Szatkowski, Jazbec, Wojcik, "Rethinking
Calibration for Early-Exit Neural Networks", arXiv:2508.21495, first titled "Failure Prediction
Is a Better Performance Proxy for Early-Exit Networks Than Calibration", study post-hoc
calibration of every internal classifier and show that it does not preserve the ranking of
samples within a classifier): one scalar T_k > 0 per exit, the final exit included, and exit k
decides on ``softmax(z_k / T_k)``. Each T_k minimises the mean negative log-likelihood (nats)
of val's labels under ``softmax(z_k / T)``, exit by exit. The fit is a **golden-section search
on log T over [T_MIN, T_MAX]** (not LBFGS): the NLL is convex in 1/T (a log-sum-exp of
functions linear in 1/T, minus a linear one), so it is unimodal in log T and the bounded 1-D
search finds its minimum (to ``TOL`` in log T, computed in float64) with no step size to tune;
an optimum past a bound (val perfectly separated: NLL falls as T -> 0) stops at the bound. T_k
is then rounded to float32, so the model, the exported graph's constant and the runtime's host
path all divide by the same number. ``none`` keeps every T_k = 1.

**What it changes.** T > 0 keeps each exit's argmax, so per-exit accuracy and ``patience``
(which reads the argmax only) are unaffected. It changes ``max_softmax`` confidences and
``entropy`` values, and not only their scale: for more than two classes it can reorder samples
*within one exit* (conf(z/T) depends on the whole logit vector, not only on conf(z): with T =
2, ``[0, 0, -20]`` stays at 0.5 while ``[log 2, 0, 0]`` drops from 0.5 to 0.41), the ranking
change Kubaty et al. report; with two classes conf is a monotone function of the margin and the
order is kept. So thresholds fitted on uncalibrated statistics do not carry over: they are
fitted after calibration, on the calibrated statistics.

**Where it applies** (wherever the deployed model's logits exist):

- ``exitnas finetune`` fits T_k on val after training, then the thresholds on the calibrated
  statistics (:mod:`exitnas.finetune`); ``exitnas retrain`` fits T_k after training (its
  thresholds are the arch's, not fitted). Both store them next to the weights:
  ``calibration.json`` (``method``, ``temperatures``, val NLL per exit before and after, the
  weights' file name and sha256), written atomically after the weights, read by allowlist
  (:func:`load`): a malformed file is one line naming it; one made for other weights is stale
  (training fits again; the export treats it as refused). A rerun reuses a stored calibration
  of the configured method and fits again when ``policy.calibration`` changed.
- The export (:mod:`exitnas.export`) takes the T_k stored with the weights it exports (none
  stored: T_k = 1) and bakes each into its exit graph (``ExitGraph`` divides the head's logits
  by the constant T_k before the statistics); ``arch.json`` records ``exits[k].temperature``;
  format-2 / host-statistics runs of the runtime divide by it; ``model.pt2`` / ``head_k`` keep
  the raw logits. The supernet's sub-network (the default export, what the search scored)
  ships uncalibrated: its thresholds were fitted on uncalibrated statistics.
- Search scoring is uncalibrated: it scores cached statistics (conf, entropy, argmax), which
  hold no logits to rescale, and the cache format is unchanged. The search's thresholds and
  ranking are those of the uncalibrated sub-networks; fine-tune a pick to calibrate it.

A calibration of your own is ``@register("name")`` on a :class:`Calibration` whose ``fit``
returns one positive divisor per exit; ``policy.calibration: name`` then selects it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .errors import CheckpointError
from .registry import Registry

T_MIN, T_MAX = 1e-2, 1e2  # bounds of the temperature search
TOL = 1e-6                # golden-section tolerance in log T
FILE = "calibration.json"
FORMAT = "exitnas-calibration"
_GOLDEN = (math.sqrt(5) - 1) / 2


class Calibration:
    """Base class: ``fit`` maps every exit's val logits ([N, C] each, final exit last) and the
    labels [N] to one divisor T_k > 0 per exit."""

    name: str = ""  # set by :func:`register`

    def fit(self, logits: Sequence[torch.Tensor], labels: torch.Tensor) -> tuple[float, ...]:
        raise NotImplementedError


CALIBRATIONS: Registry[type[Calibration]] = Registry("calibration")


def register(name: str) -> Callable[[type[Calibration]], type[Calibration]]:
    add = CALIBRATIONS.register(name)

    def deco(cls: type[Calibration]) -> type[Calibration]:
        cls.name = name
        return add(cls)
    return deco


@register("none")
class NoCalibration(Calibration):
    """Every T_k = 1: exits decide on the raw logits."""

    def fit(self, logits, labels):
        return (1.0,) * len(logits)


@register("temperature")
class TemperatureScaling(Calibration):
    """Per-exit temperature scaling: T_k = argmin NLL (module docs)."""

    def fit(self, logits, labels):
        return tuple(fit_temperature(z, labels) for z in logits)


# ---- the fit ------------------------------------------------------------------------------
def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``; T = 1 returns ``logits`` itself (the graph an uncalibrated
    export traces is unchanged)."""
    return logits if temperature == 1.0 else logits / temperature


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of ``labels`` under softmax(logits / T), float64."""
    z = logits.double() / temperature
    return float((torch.logsumexp(z, dim=1) - z.gather(1, labels.long().view(-1, 1))[:, 0]).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [T_MIN, T_MAX] minimising :func:`nll`, by golden-section search on log T,
    rounded to float32."""
    z, y = logits.detach().double().cpu(), labels.detach().long().cpu()
    f = lambda u: nll(z, y, math.exp(u))  # noqa: E731
    a, b = math.log(T_MIN), math.log(T_MAX)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > TOL:
        if fc <= fd:  # the minimum is in [a, d]
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    return float(np.float32(math.exp((a + b) / 2)))


@dataclass(frozen=True, kw_only=True)
class Fitted:
    """A calibration of one model: its method, T_k per exit (final last) and the val NLL per
    exit in nats at T = 1 and at T_k."""

    method: str
    temperatures: tuple[float, ...]
    val_nll_before: tuple[float, ...]
    val_nll_after: tuple[float, ...]

    def to_json(self) -> dict:
        return {"method": self.method, "temperatures": list(self.temperatures),
                "val_nll_before": list(self.val_nll_before),
                "val_nll_after": list(self.val_nll_after)}


def check_temperatures(values, num_exits: int) -> tuple[float, ...]:
    """``values`` as a tuple of ``num_exits`` floats in [1e-30, 1e30] (positive float32
    numbers, as the graphs divide in float32), else ValueError."""
    values = tuple(values)
    if len(values) != num_exits:
        raise ValueError(f"{len(values)} temperature(s) for {num_exits} exits")
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or \
                not 1e-30 <= t <= 1e30:
            raise ValueError(f"temperature {repr(t)[:40]} is not a number in [1e-30, 1e30]")
    return tuple(float(t) for t in values)


@torch.no_grad()
def exit_logits(model, batches: Iterable) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every exit's raw logits ([N, C] float32 on the CPU, final last) and the labels of one
    pass of ``model`` (eval mode for the pass) over ``batches`` of (images, labels)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    parts, labels = [], []
    try:
        for x, y in batches:
            parts.append([z.float().cpu() for z in model.forward_exits(x.to(device))])
            labels.append(y.long().cpu())
    finally:
        model.train(was)
    if not parts:
        raise ValueError("calibration got no val batches")
    return [torch.cat(p) for p in zip(*parts)], torch.cat(labels)


def fit_calibration(model, method: str, batches: Iterable) -> Fitted:
    """Fit ``method`` (a :data:`CALIBRATIONS` name) on ``model``'s logits over ``batches``
    (val); ``model`` is not changed."""
    logits, labels = exit_logits(model, batches)
    temps = check_temperatures(CALIBRATIONS.get(method)().fit(logits, labels), len(logits))
    return Fitted(method=method, temperatures=temps,
                  val_nll_before=tuple(nll(z, labels) for z in logits),
                  val_nll_after=tuple(nll(z, labels, t) for z, t in zip(logits, temps)))


# ---- calibration.json, next to the weights ------------------------------------------------
_KEYS = {"format", "version", "method", "temperatures", "val_nll_before", "val_nll_after",
         "weights", "weights_sha256"}


def store(weights: Path, fitted: Fitted) -> Path:
    """Write ``fitted`` as ``calibration.json`` beside ``weights`` (which must exist: its
    sha256 binds the file to them), atomically."""
    from .io import atomic_write_json
    from .runtime import sha256_file

    path = Path(weights).parent / FILE
    atomic_write_json(path, {"format": FORMAT, "version": 1, **fitted.to_json(),
                             "weights": Path(weights).name,
                             "weights_sha256": sha256_file(weights)})
    return path


def _numbers(data: dict, key: str, n: int, where: Path, positive: bool) -> tuple[float, ...]:
    try:
        if positive:
            return check_temperatures(data[key], n)
        values = tuple(data[key])
        if len(values) != n or not all(type(v) in (int, float) and abs(v) <= 1e300
                                       for v in values):
            raise ValueError(f"is not {n} finite numbers")
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {key}: {err}") from None


def load(weights: Path, num_exits: int, *, stale: str = "refuse") -> Fitted | None:
    """The calibration stored beside ``weights`` for a model of ``num_exits`` exits: None
    when there is none (or it names another weights file); a malformed file is a one-line
    CheckpointError. One fitted for other weights (sha256 differs) is refused too, or None
    with ``stale="ignore"`` (training fits again)."""
    from .runtime import sha256_file

    weights = Path(weights)
    path = weights.parent / FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes()[:1 << 20].decode("utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not JSON ({str(err)[:80]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != 1:
        raise CheckpointError(f"{path}: not an exitnas calibration file (format {FORMAT!r}, "
                              "version 1)")
    if set(data) != _KEYS:
        odd = sorted(set(data) ^ _KEYS)[0]
        what = "missing" if odd in _KEYS else "unknown"
        raise CheckpointError(f"{path}: key {odd[:40]!r} is {what}")
    if not isinstance(data["method"], str) or data["method"] not in CALIBRATIONS:
        raise CheckpointError(f"{path}: method {str(data['method'])[:40]!r} is not one of "
                              f"{', '.join(CALIBRATIONS.names())}")
    sha = data["weights_sha256"]
    if not (isinstance(data["weights"], str) and isinstance(sha, str) and len(sha) == 64
            and all(c in "0123456789abcdef" for c in sha)):
        raise CheckpointError(f"{path}: weights / weights_sha256 are not a file name and a "
                              "sha256")
    fitted = Fitted(method=data["method"],
                    temperatures=_numbers(data, "temperatures", num_exits, path, True),
                    val_nll_before=_numbers(data, "val_nll_before", num_exits, path, False),
                    val_nll_after=_numbers(data, "val_nll_after", num_exits, path, False))
    if data["weights"] != weights.name:
        return None
    if sha256_file(weights) != sha:
        if stale == "ignore":
            return None
        raise CheckpointError(f"{path}: fitted for other weights (sha256 of {weights.name} "
                              "differs); fine-tune / retrain again to re-fit it, or delete it")
    return fitted


def reuse_or_fit(model, weights: Path, method: str, batches: Callable[[], Iterable], *,
                 reuse: bool) -> tuple[Fitted, bool]:
    """(calibration, reused) of ``model``, whose weights are the file ``weights``: with
    ``reuse`` (a finished run), the one stored beside it when it is of ``method`` and for these
    weights; else ``method`` fitted on ``batches()`` (val). Nothing is written."""
    if reuse and Path(weights).is_file():
        old = load(weights, model.num_exits, stale="ignore")
        if old is not None and old.method == method:
            return old, True
    return fit_calibration(model, method, batches()), False


def space_doc() -> str:
    """The config reference's line for ``policy.calibration``."""
    return (f"calibration of the exit statistics ({', '.join(CALIBRATIONS.names())}; "
            "temperature: one T_k per exit, fitted on val by NLL): fitted after retrain / "
            "finetune (finetune then fits its thresholds on the calibrated statistics), "
            "stored beside the weights and baked into their export; search scoring is "
            "uncalibrated")


__all__ = ["CALIBRATIONS", "Calibration", "register", "Fitted", "fit_calibration",
           "fit_temperature", "nll", "scale_logits", "check_temperatures", "exit_logits",
           "store", "load", "reuse_or_fit", "FILE", "T_MIN", "T_MAX"]
