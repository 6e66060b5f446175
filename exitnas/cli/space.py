"""``exitnas space check FILE`` and ``exitnas cost FILE``."""
from __future__ import annotations

import json

from pathlib import Path

from . import add_set_argument, command, parse_sets
from ..arch import Arch
from ..cost import COUNTED_MACS, backbone_params, cost_table
from ..space import load_space


def _short(counted: str) -> str:
    return "fvcore, batch 1" if counted == COUNTED_MACS else counted.split(";")[0]


@command("space check", help="validate a search-space YAML file and summarise it")
class SpaceCheck:
    @staticmethod
    def add_arguments(p):
        p.add_argument("file")

    @staticmethod
    def run(args):
        space = load_space(args.file)
        bb = space.backbone
        n_depth = len(space.depth_settings())
        print(f"{args.file}: ok — space {space.name!r} v{space.version}, {bb.family}/{bb.block or bb.model}, "
              f"{len(space.stage_depths)} stages, {n_depth} depth settings, "
              f"{len(space.positions())} exit positions x {len(space.exits.heads)} heads, "
              f"<= {space.exits.max_exits} exits, policies {', '.join(space.policy.names)}")


@command("cost", help="per-exit costs of an arch or of the plain backbone by the space's cost "
                      "model (fvcore MACs at batch 1 by default), and the backbone's parameters")
class Cost:
    @staticmethod
    def add_arguments(p):
        p.add_argument("file", help="search-space YAML")
        p.add_argument("--arch", help="arch id, JSON, or JSON file (default: backbone only)")
        p.add_argument("--format", choices=("table", "json"), default="table")
        p.add_argument("--table-out", metavar="CSV", help="also write every segment's cost as "
                       "the CSV that cost.model 'table' reads (measure on the target device "
                       "with --set cost.model=latency, search anywhere)")
        add_set_argument(p)

    @staticmethod
    def run(args):
        parsed = Arch.parse(args.arch) if args.arch else None  # a bad id fails before any work
        space = load_space(args.file, parse_sets(args.set))
        if parsed is not None:
            arch = parsed.validate(space)
        else:  # the plain backbone: no early exit
            arch = Arch(depths=space.max_depths, exits=())
        from ..supernet import Supernet

        params = backbone_params(Supernet(space, pretrained=False))  # weights: not loaded
        table = cost_table(space)
        if args.table_out:
            from ..cost_csv import write_table

            write_table(table, Path(args.table_out))
        u = table.unit
        backbone, costs = table.backbone(), table.exit_costs(arch)
        exits = [{"position": f"s{e.stage}b{e.block}", "head": e.head, u.key: c,
                  "relative": c / backbone} for e, c in zip(arch.exits, costs)]
        exits.append({"position": "final", "head": space.backbone.final_head, u.key: costs[-1],
                      "relative": costs[-1] / backbone})
        if args.format == "json":
            print(json.dumps({"space": space.name, "arch": arch.id, "cost_unit": u.key,
                              "counted": table.counted, u.name("backbone"): backbone,
                              "backbone_params": params,
                              "input": [space.input.channels, space.input.size, space.input.size],
                              "exits": exits}, indent=2))
            return
        shown = ",.0f" if u.integer else ",.4f"
        print(f"space {space.name}  arch {arch.id}")
        print(f"plain backbone: {u.show(backbone)} ({_short(table.counted)})")
        print(f"backbone parameters: {params:,} (stem, blocks, final head; no exit heads)")
        print(f"{'exit':<10}{'head':<12}{'C_k ' + u.label:>16}{'relative':>10}")
        for e in exits:
            print(f"{e['position']:<10}{e['head']:<12}{e[u.key]:>16{shown}}{e['relative']:>10.3f}")
