"""``exitnas run CONFIG --run-dir DIR``: the whole pipeline, resumable step by step."""
from __future__ import annotations

from . import add_set_argument, command, parse_sets


@command("run", help="supernet -> search -> retrain -> export -> report (rerun to resume)")
class Run:
    @staticmethod
    def add_arguments(p):
        p.add_argument("config", help="search-space YAML")
        p.add_argument("--run-dir", required=True, help="run directory (created if missing)")
        add_set_argument(p)

    @staticmethod
    def run(args):
        from ..pipeline import run_pipeline
        from ..rundir import RunDir
        from ..space import load_space

        space = load_space(args.config, parse_sets(args.set))
        run_pipeline(RunDir(args.run_dir), space)
