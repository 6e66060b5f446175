"""``exitnas quantize RUN --export DIR [--out DIR_INT8] [--calib-batches N]``: an int8 copy of
an export, thresholds re-fitted on val for the fp32 export's cost (see :mod:`exitnas.quantize`)."""
from __future__ import annotations

from pathlib import Path

from . import command


@command("quantize", help="int8 copy of an export (ONNX Runtime static quantisation, QDQ), "
                          "thresholds re-fitted on val for the fp32 export's expected cost")
class Quantize:
    @staticmethod
    def add_arguments(p):
        p.add_argument("run_dir", help="run directory the export came from (its train batches "
                                       "calibrate, its val split re-fits the thresholds)")
        p.add_argument("--export", required=True, help="fp32 export folder (with ONNX graphs); "
                                                       "only read")
        p.add_argument("--out", help="output folder (default: DIR-int8)")
        p.add_argument("--calib-batches", type=int, metavar="N",
                       help="training batches (data.batch_size images each) to calibrate on "
                            "(default 8: exitnas.quantize.CALIB_BATCHES)")

    @staticmethod
    def run(args):
        from ..quantize import CALIB_BATCHES, quantize_export
        from ..units import unit_of

        n = CALIB_BATCHES if args.calib_batches is None else args.calib_batches
        result = quantize_export(args.run_dir, Path(args.export), args.out, calib_batches=n)
        m, q = result.manifest, result.manifest["quantization"]
        unit = unit_of(q["thresholds"]["cost_unit"])
        cost = unit.name("expected")
        cal, fp, i8 = q["calibration"], q["val"]["fp32"], q["val"]["int8"]
        print(f"quantised {len(m['graphs'])} graphs of {args.export} to {result.out} (int8 QDQ, "
              f"per-channel weights; calibrated on {cal['batches']} train batches, "
              f"{cal['images']} images)")
        diffs = ", ".join(f"{e['name']} {e['int8_max_abs_diff']:.3g}" for e in m["exits"])
        print(f"max |int8 - fp32| of exit logits on {q['check']['images']} val images: {diffs}")
        print(f"val: fp32 acc {fp['accuracy']:.4f} at {unit.show(fp[cost])}, int8 acc "
              f"{i8['accuracy']:.4f} at {unit.show(i8[cost])} (budget "
              f"{unit.show(q['thresholds'][unit.name('budget')])})")
        print(f"thresholds: {fp['arch']} -> {i8['arch']}")
        if not q["thresholds"].get("feasible", True):
            print("note: no thresholds in the policy's range meet the budget on the int8 "
                  "graphs; the cheapest start is kept (arch.json: quantization.thresholds)")
        print(f"files: {', '.join(result.files)}")
        print(f"run it: exitnas predict {result.out} IMAGES --backend onnx")
