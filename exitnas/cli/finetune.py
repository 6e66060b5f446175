"""``exitnas finetune RUN --arch ID --regime R --epochs N``: continue a searched arch from its
inherited supernet weights, then re-fit its thresholds (see :mod:`exitnas.finetune`). Resumes
like ``retrain``: rerunning continues from the last checkpoint, or does nothing when done.
Runs alone, under torchrun, or on Ray Train workers with ``--backend ray``
(:mod:`exitnas.ray_train`)."""
from __future__ import annotations

from . import add_set_argument, command, parse_sets
from ..units import unit_of
from .train import add_backend_arguments, run_training


@command("finetune", help="fine-tune an arch from its inherited supernet weights and re-fit "
                          "its thresholds for the same expected cost")
class Finetune:
    @staticmethod
    def add_arguments(p):
        p.add_argument("run_dir", help="run directory with a trained supernet")
        p.add_argument("--arch", required=True, help="arch id, JSON, or JSON file (e.g. a "
                                                     "search's front member)")
        p.add_argument("--regime", choices=("mixed", "disjoint"), default="mixed",
                       help="mixed: backbone and heads train (default); disjoint: heads only, "
                            "the backbone frozen (BatchNorm in eval mode)")
        p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: retrain.epochs "
                                                  "of the run's config)")
        add_set_argument(p)
        g = p.add_mutually_exclusive_group()
        g.add_argument("--resume", action="store_true",
                       help="continue from the last checkpoint; error if there is none")
        g.add_argument("--restart", action="store_true",
                       help="ignore any checkpoint and fine-tune from the inherited weights")
        add_backend_arguments(p)

    @staticmethod
    def run(args):
        from ..arch import Arch
        from ..finetune import finetune, finetune_dir
        from ..rundir import RunDir

        run_dir = RunDir(args.run_dir)
        space = run_dir.space(parse_sets(args.set))
        arch = Arch.parse(args.arch)

        def job(dist, *, resume: bool, restart: bool):
            return finetune(run_dir, arch, space=space, regime=args.regime, epochs=args.epochs,
                            dist=dist, resume=resume, restart=restart)

        def describe(result) -> str:
            val, inh = result.manifest["val"], result.manifest["inherited"]
            unit = unit_of(result.manifest.get("cost_unit", "macs"))  # older runs: MACs
            cost = unit.name("expected")
            return (f"fine-tuned ({result.regime}, {result.manifest['epochs']} epochs): "
                    f"{result.arch.id}\n"
                    f"val acc {val['accuracy']:.4f} at {unit.show(val[cost])} "
                    f"(inherited {inh['accuracy']:.4f} at {unit.show(inh[cost])})\n"
                    f"outputs: {result.out}/{{model.safetensors,arch.json,metrics.csv}}\n"
                    f"next: exitnas export {args.run_dir} --arch {result.out}/arch.json "
                    f"--weights {result.out}/model.safetensors")

        run_training(args, job, describe, name="finetune",
                     checkpoint=finetune_dir(run_dir, arch, args.regime) / "checkpoint.pt")
