"""``exitnas report RUN``: protocol tables and plots of every retrained model."""
from __future__ import annotations

from . import command
from ..rundir import RunDir


@command("report", help="evaluate every retrained model of a run with every protocol "
                        "(thresholds fitted on val, accuracy on test); write RUN/report/")
class Report:
    @staticmethod
    def add_arguments(p):
        p.add_argument("run_dir", metavar="RUN", help="run directory")
        p.add_argument("--batch-size", type=int, default=None,
                       help="evaluation batch size (default: data.eval_batch_size)")

    @staticmethod
    def run(args):
        from ..errors import ConfigError
        from ..report import write_report

        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError(f"{args.batch_size} is not >= 1", file="--batch-size")
        result = write_report(RunDir(args.run_dir), batch_size=args.batch_size)
        for e in result.models:
            print(f"evaluated {e.arch.id} ({e.regime})")
        print(f"report: {len(result.models)} model(s) -> {result.folder} "
              f"({len(result.files)} files: {', '.join(result.files)})")
