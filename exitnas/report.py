"""``RUN/report/``: every evaluation protocol for every model of a run, as tables and plots.

    result = write_report(RunDir("runs/q"))     # or: exitnas report runs/q

Models (:func:`find_models`): the exports of the supernet's own weights (``inherited``), the
fine-tuned and the retrained-from-scratch models, one arch's side by side. Each model makes one pass over val
and one over test with every exit computed (``ArchStats.from_model``); every protocol fits its
thresholds on val and reports test. Costs come from the space's cost table, in its unit (fvcore
MACs at batch 1 by default; columns name the unit: ``backbone_macs``, ``test_relative_ms``);
relative costs divide by the plain backbone (all blocks, final head only).

Files: ``models``, ``policy`` (the arch's own policy and thresholds), ``anytime``,
``threshold_budgets`` (accuracy at 25/50/75/100 % of the backbone's cost), ``threshold_sweep``,
``budgeted_batch``, ``auc``, ``oracle`` and ``front`` (copied from ``RUN/search/front.csv``
when present) as ``.csv`` and in ``report.md``; PNGs ``threshold_sweep.png``,
``budgeted_batch.png``, ``anytime.png`` (accuracy vs relative cost, one line per model, the
oracle as a star), ``exit_accuracy.png`` (test accuracy of every exit) and ``front.png``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import protocols as P
from .arch import Arch
from .errors import RunDirError
from .evaluate import ArchStats
from .rundir import RunDir

TABLES = ("models", "policy", "anytime", "threshold_budgets", "threshold_sweep",
          "budgeted_batch", "auc", "oracle")
PLOTS = ("threshold_sweep.png", "budgeted_batch.png", "anytime.png", "exit_accuracy.png")


@dataclass(frozen=True)
class ModelEntry:
    arch: Arch
    regime: str
    weights: Path


@dataclass(frozen=True)
class ReportResult:
    folder: Path
    files: tuple[str, ...]
    models: tuple[ModelEntry, ...]


def find_models(run: RunDir) -> list[ModelEntry]:
    """Every model of the run, one arch's side by side: exports of the supernet's own weights
    (``export/<arch id>/``, regime ``inherited``), fine-tuned models
    (``finetune/<arch>/<regime>/``, regime ``finetuned-<regime>``) and models retrained from
    scratch (``retrain/<arch id>/<regime>/``, regime ``<regime>``)."""
    import json

    out = []
    for weights in sorted((run.path / "export").glob("*/weights.safetensors")):
        try:
            manifest = json.loads((weights.parent / "arch.json").read_text())
            inherited = manifest["source"]["weights"] == "supernet"
            arch = Arch.from_json(manifest["arch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a complete export: `exitnas export` reports it
        if inherited:
            out.append(ModelEntry(arch, "inherited", weights))
    for kind, prefix in (("finetune", "finetuned-"), ("retrain", "")):
        for weights in sorted((run.path / kind).glob("*/*/model.safetensors")):
            regime_dir = weights.parent
            for meta in (regime_dir / "arch.json", regime_dir.parent / "arch.json"):
                if meta.is_file():
                    arch = Arch.parse(str(meta))
                    break
            else:
                arch = Arch.from_id(regime_dir.parent.name)
            out.append(ModelEntry(arch, prefix + regime_dir.name, weights))
    return sorted(out, key=lambda e: (e.arch.depths, e.arch.exits, e.regime))


def load_model(space, entry: ModelEntry):
    """The model of a report entry (eval mode): :func:`exitnas.supernet.load_model`, with the
    temperatures stored beside its weights (:mod:`exitnas.calibration`; none: T_k = 1), so its
    statistics are those its thresholds were fitted on."""
    from . import calibration
    from .supernet import load_model as load

    model = load(space, entry.arch.validate(space), entry.weights)
    fitted = calibration.load(entry.weights, model.num_exits)
    if fitted is not None:
        model.set_temperatures(fitted.temperatures)
    return model


def _fmt_params(values) -> str:
    return ",".join("inf" if math.isinf(v) else f"{v:.4f}" for v in values)


def model_tables(entry: ModelEntry, val: ArchStats, test: ArchStats) -> dict[str, pd.DataFrame]:
    """Every protocol's table for one model; each starts with ``arch`` and ``regime``."""
    arch = entry.arch
    av, at = P.anytime(val), P.anytime(test)
    anytime = at.rename(columns={"accuracy": "test_accuracy"})
    anytime.insert(len(anytime.columns) - 1, "val_accuracy", av["accuracy"])
    own_v = P.policy_score(val, arch.policy, arch.thresholds)
    own_t = P.policy_score(test, arch.policy, arch.thresholds)
    policy = pd.concat([own_v[["policy", "params"]],
                        own_v.drop(columns=["policy", "params"]).add_prefix("val_"),
                        own_t.drop(columns=["policy", "params"]).add_prefix("test_")], axis=1)
    sv, st = P.threshold_sweep(val), P.threshold_sweep(test)
    sweep = pd.concat([sv.add_prefix("val_").rename(columns={"val_threshold": "threshold"}),
                       st.drop(columns=["threshold"]).add_prefix("test_")], axis=1)
    budgets = P.apply_sweep_budgets(P.fit_sweep_budgets(sv), test)
    bb = P.budgeted_batch(val, test)
    bb["thresholds"] = bb["thresholds"].map(_fmt_params)
    oracle = P.oracle(test)
    for df in (policy, oracle):
        for col in [c for c in df.columns if c.endswith("exit_fractions")]:
            df[col] = df[col].map(lambda v: ";".join(f"{f:.4f}" for f in v))
    models = pd.DataFrame([{"policy": arch.policy, "params": _fmt_params(arch.thresholds),
                            "exits": ",".join(test.names), "val_samples": val.num_samples,
                            "test_samples": test.num_samples,
                            test.unit.name("backbone"): test.backbone_cost,
                            "weights": str(entry.weights)}])
    tables = {"models": models, "policy": policy, "anytime": anytime, "threshold_budgets": budgets,
              "threshold_sweep": sweep, "budgeted_batch": bb, "auc": P.auc_table(val, test),
              "oracle": oracle}
    for df in tables.values():
        df.insert(0, "regime", entry.regime)
        df.insert(0, "arch", arch.id)
    return tables


def markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A Markdown table (floats with ``digits`` decimals, NaN empty); no extra dependency."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _plots(folder: Path, t: dict[str, pd.DataFrame], unit) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(zip(t["models"]["arch"], t["models"]["regime"])))
    label = {k: f"{k[1]}: {k[0]}" if len(k[0]) < 60 else f"{k[1]}: {k[0][:57]}..." for k in keys}
    written = []
    rel = unit.name("relative")
    curves = {"threshold_sweep": (f"test_{rel}", "test_accuracy", "-"),
              "budgeted_batch": (f"test_{rel}", "test_accuracy", "-o"),
              "anytime": (rel, "test_accuracy", "-s")}
    for name, (x, y, style) in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in keys:
            df = t[name][(t[name]["arch"] == k[0]) & (t[name]["regime"] == k[1])].sort_values(x)
            line, = ax.plot(df[x], df[y], style, ms=3, label=label[k])
            o = t["oracle"][(t["oracle"]["arch"] == k[0]) & (t["oracle"]["regime"] == k[1])]
            ax.plot(o[rel], o["accuracy"], "*", ms=10, color=line.get_color())
        ax.set_xlabel(f"expected {unit.label} / backbone {unit.label} (test)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name.replace('_', ' ')} (star: oracle)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=120)
        plt.close(fig)
        written.append(f"{name}.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in keys:
        df = t["anytime"][(t["anytime"]["arch"] == k[0]) & (t["anytime"]["regime"] == k[1])]
        ax.plot(df["exit"], df["test_accuracy"], "-o", ms=4, label=label[k])
    ax.set_xlabel("exit (last = final)")
    ax.set_ylabel("test accuracy of the exit on every sample")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "exit_accuracy.png", dpi=120)
    plt.close(fig)
    written.append("exit_accuracy.png")
    if "front" in t and {"accuracy", "relative_cost"} <= set(t["front"].columns):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        f = t["front"].sort_values("relative_cost")
        ax.step(f["relative_cost"], f["accuracy"], "-o", where="post", ms=4)
        ax.set_xlabel(f"expected {unit.label} / backbone {unit.label} (val)")
        ax.set_ylabel("val accuracy")
        ax.set_title("search front")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "front.png", dpi=120)
        plt.close(fig)
        written.append("front.png")
    return written


def write_report(run: RunDir, *, batch_size: int | None = None) -> ReportResult:
    """Evaluate every retrained model of ``run`` and write ``RUN/report/``."""
    from .cost import cost_table
    from .data import batches, load_splits
    from .io import atomic_path, atomic_write_text

    space = run.space()
    entries = find_models(run)
    if not entries:
        raise RunDirError(f"{run.path}: no model found (no export of the supernet's weights, "
                          "no finetune/ or retrain/ model); run `exitnas export`, `exitnas "
                          "finetune` or `exitnas retrain` first")
    splits = load_splits(space)
    costs = cost_table(space)
    bs = batch_size or space.data.eval_batch_size
    per_model = []
    for entry in entries:
        model = load_model(space, entry)
        val, test = (ArchStats.from_model(model, batches(s, batch_size=bs, mean=splits.mean,
                                                         std=splits.std),
                                          costs=costs, arch=entry.arch)
                     for s in (splits.val, splits.test))
        per_model.append(model_tables(entry, val, test))
    tables = {name: pd.concat([m[name] for m in per_model], ignore_index=True) for name in TABLES}
    front_csv = run.path / "search" / "front.csv"
    if front_csv.is_file():
        tables["front"] = pd.read_csv(front_csv)
    folder = run.sub("report")
    files = []
    for name, df in tables.items():
        with atomic_path(folder / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False, float_format="%.4f")
        files.append(f"{name}.csv")
    files += _plots(folder, tables, costs.unit)
    md = [f"# Report — run `{run.path}`, space `{space.name}`", "",
          f"Thresholds fitted on val ({len(splits.val)} samples), accuracy on test "
          f"({len(splits.test)} samples). Costs: {costs.counted}; relative = / plain backbone "
          f"({costs.unit.show(costs.backbone())}).", ""]
    for name, df in tables.items():
        if name == "threshold_sweep":
            md += ["## threshold_sweep", "", "100 thresholds, same at every exit: see "
                   "`threshold_sweep.csv` and `threshold_sweep.png`.", ""]
            continue
        md += [f"## {name}", "", markdown(df)]
        if name in ("anytime", "budgeted_batch"):
            md += [f"![{name}]({name}.png)", ""]
    md += ["![threshold sweep](threshold_sweep.png)", "", "![exit accuracy](exit_accuracy.png)", ""]
    if "front.png" in files:
        md += ["![search front](front.png)", ""]
    atomic_write_text(folder / "report.md", "\n".join(md))
    files.append("report.md")
    return ReportResult(folder, tuple(files), tuple(entries))


__all__ = ["ModelEntry", "ReportResult", "find_models", "load_model", "model_tables",
           "markdown", "write_report"]
