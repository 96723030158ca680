"""OpenPCDet's DSVT loaded from a checkout and timed beside ours on the same voxels.

    python tools/benchmark.py --model voxelnext_nuscenes --device cuda --voxels 153782 --compare /path/to/OpenPCDet
    python tools/benchmark.py --model dsvt_voxel_waymo --device cuda --voxels 100000 --compare /path/to/OpenPCDet
    python tools/openpcdet_ref.py /path/to/OpenPCDet --voxels 5000 --device cpu    # DSVT only

Only the needed source files are executed, by path, under stub packages
(:mod:`voxsparse.benchmark.openpcdet`). OpenPCDet's ``DSVT`` is pure PyTorch except for one compiled
CUDA op, ``ingroup_inds``, replaced by sort + cumsum, so the reference runs on the CPU and on any
CUDA build. It is configured from the checkout's ``tools/cfgs/waymo_models/dsvt_voxel.yaml``, which
``configs/model/dsvt_voxel_waymo.yaml`` mirrors. The voxels come from our voxel encoder on a
synthetic frame; OpenPCDet's backbone gets a fixed random (M, 192) feature per voxel in place of its
192-channel VFE output, on the same coordinates. The result (:func:`voxsparse.benchmark.compare.
compare_dsvt`) is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from voxsparse.benchmark.compare import Alternation, compare_dsvt
from voxsparse.benchmark.inputs import synthetic_voxels
from voxsparse.benchmark.stages import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("openpcdet", type=Path, help="an OpenPCDet checkout")
    parser.add_argument("--voxels", type=int, default=5000, help="voxels of the synthetic input")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="also time forward+backward")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    model = build_model("dsvt_voxel_waymo")
    voxels = synthetic_voxels(model, args.voxels)
    alternation = Alternation(rounds=args.rounds, per_round=args.per_round, warmup=args.warmup)
    result = compare_dsvt(model.backbone, voxels, args.openpcdet, torch.device(args.device), alternation, args.train)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
