"""A voxsparse reference config beside the OpenPCDet (or DSVT repository) detector it reproduces.

    python tools/parity.py --openpcdet /path/to/OpenPCDet --model voxelnext_nuscenes
    python tools/parity.py --openpcdet /path/to/OpenPCDet --model centerpoint_nuscenes --device cuda \
        --points sweep.pcd.bin --format nuscenes
    python tools/parity.py --openpcdet /path/to/DSVT --model dsvt_pillar_nuscenes --reduced

The reference is built from the checkout's yaml at full size (``--reduced``: the reduced widths of
``voxsparse.benchmark.parity.REFERENCE_CONFIGS``) with random weights and random BatchNorm
statistics; its state dict is converted to the voxsparse model; both run on one frame (a real scan
with ``--points``, else the synthetic world). Printed: every stage both expose (relative max abs
difference), the decoded boxes compared as sets, the training loss (synthetic frames only: a scan
has no boxes), largest difference first. Exit status 1 when a row does not match or a difference
exceeds ``--tolerance``; bad input is one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from voxsparse.benchmark.parity import REFERENCE_CONFIGS, run_parity
from voxsparse.engine.cli import USER_ERRORS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--openpcdet", type=Path, required=True,
                        help="the reference checkout (the DSVT repository for dsvt_pillar_nuscenes)")
    parser.add_argument("--model", required=True, choices=sorted(REFERENCE_CONFIGS), help="the voxsparse config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=Path, help="a point file (.bin .npy .pcd .ply) instead of the synthetic frame")
    parser.add_argument("--format", help="the point file's layout (nuscenes, waymo, kitti, ...), as tools/predict.py")
    parser.add_argument("--reduced", action="store_true", help="both models at reduced width")
    parser.add_argument("--seed", type=int, default=0, help="weights, statistics and synthetic frame")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference accepted")
    args = parser.parse_args()
    try:
        result, report = run_parity(args.model, args.openpcdet, args.device, args.points, args.reduced, args.seed,
                                    args.format)
    except USER_ERRORS as exc:
        if os.environ.get("VOXSPARSE_DEBUG"):
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        sys.exit(2)
    print(report.summary())
    print(result.table())
    sys.exit(0 if result.ok(args.tolerance) else 1)


if __name__ == "__main__":
    main()
