"""``exitnas space check FILE`` and ``exitnas cost FILE``."""
from __future__ import annotations

import json

from . import command
from ..arch import Arch
from ..cost import backbone_params, build_cost_table
from ..space import load_space


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


@command("cost", help="per-exit MACs (fvcore, batch 1) of an arch or of the plain backbone, "
                      "and the backbone's parameter count")
class Cost:
    @staticmethod
    def add_arguments(p):
        p.add_argument("file", help="search-space YAML")
        p.add_argument("--arch", help="arch id, JSON, or JSON file (default: backbone only)")
        p.add_argument("--format", choices=("table", "json"), default="table")

    @staticmethod
    def run(args):
        parsed = Arch.parse(args.arch) if args.arch else None  # a bad id fails before any work
        space = load_space(args.file)
        if parsed is not None:
            arch = parsed.validate(space)
        else:  # the plain backbone: no early exit
            arch = Arch(depths=space.max_depths, exits=())
        from ..supernet import Supernet

        net = Supernet(space, pretrained=False)  # weights change no count: not loaded
        table = build_cost_table(net)
        backbone, params = table.backbone(), backbone_params(net)
        costs = table.exit_costs(arch)
        exits = [{"position": f"s{e.stage}b{e.block}", "head": e.head, "macs": c,
                  "relative": c / backbone} for e, c in zip(arch.exits, costs)]
        exits.append({"position": "final", "head": space.backbone.final_head, "macs": costs[-1],
                      "relative": costs[-1] / backbone})
        if args.format == "json":
            print(json.dumps({"space": space.name, "arch": arch.id, "backbone_macs": backbone,
                              "backbone_params": params,
                              "input": [space.input.channels, space.input.size, space.input.size],
                              "exits": exits}, indent=2))
            return
        print(f"space {space.name}  arch {arch.id}")
        print(f"plain backbone: {backbone:,} MACs (fvcore, batch 1)")
        print(f"backbone parameters: {params:,} (stem, blocks, final head; no exit heads)")
        print(f"{'exit':<10}{'head':<12}{'C_k MACs':>16}{'relative':>10}")
        for e in exits:
            print(f"{e['position']:<10}{e['head']:<12}{e['macs']:>16,}{e['relative']:>10.3f}")
