"""Convert an OpenPCDet checkpoint into a voxsparse checkpoint, or back.

    python tools/convert_checkpoint.py voxelnext_nuscenes.pth model.pth --from openpcdet --model voxelnext_nuscenes
    python tools/convert_checkpoint.py old_spconv1.pth model.pth --from openpcdet --model centerpoint_nuscenes --spconv 1.x
    python tools/convert_checkpoint.py model.pth openpcdet.pth --to openpcdet

From OpenPCDet: the file is read without running pickled code; every tensor is mapped to the model
config's names, shape-checked, and sparse-convolution weights are converted from the spconv version
that wrote them (found from their shapes; ``--spconv`` states it where square layers leave it open).
The result opens with ``voxsparse.load_model`` and every tool (``tools/eval.py checkpoint=...``).
The model's class names come from ``--dataset`` (default: the model name's last word where such a
dataset config exists, e.g. ``nuscenes``). To OpenPCDet: the model comes from the checkpoint's own
config; weights are written in spconv >= 2.2 layout. Bad input is one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from voxsparse.convert.openpcdet import convert_from_openpcdet, convert_to_openpcdet, model_config
from voxsparse.convert.spconv_layout import SpconvLayout
from voxsparse.engine.cli import USER_ERRORS


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="the checkpoint to read")
    parser.add_argument("dst", type=Path, help="the checkpoint to write")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=["openpcdet"], help="convert an OpenPCDet checkpoint")
    direction.add_argument("--to", dest="target", choices=["openpcdet"], help="convert a voxsparse checkpoint")
    parser.add_argument("--model", help="the voxsparse model config (configs/model/<name>.yaml); with --from")
    parser.add_argument("--dataset", help="the dataset config naming the classes; with --from")
    parser.add_argument("--spconv", choices=[lay.value for lay in SpconvLayout],
                        help="the spconv version that wrote the file (default: found from its weights)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the model config (repeatable); with --from")
    return parser.parse_args()


def _run(args: argparse.Namespace) -> None:
    if args.target:
        if args.model or args.dataset or args.spconv or args.overrides:
            raise ValueError("--to openpcdet takes the model from the checkpoint: no --model, --dataset, --spconv or --set")
        count = convert_to_openpcdet(args.src, args.dst)
        print(f"wrote {args.dst}: {count} tensors in OpenPCDet's layout (spconv >= 2.2)")
        return
    if not args.model:
        raise ValueError("--from openpcdet needs --model <config name>")
    config = model_config(args.model, args.dataset, args.overrides)
    layout = SpconvLayout(args.spconv) if args.spconv else None
    report = convert_from_openpcdet(args.src, args.dst, config, layout)
    print(report.summary())
    print(f"wrote {args.dst}")


def main() -> None:
    args = _arguments()
    try:
        _run(args)
    except USER_ERRORS as exc:
        if os.environ.get("VOXSPARSE_DEBUG"):
            raise
        print("error: " + (" ".join(str(exc).split()) or type(exc).__name__), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
