"""Mean and spread of metrics over training runs, grouped by run name: seed sweeps and ablations.

    python tools/summarize_runs.py outputs/voxelkp_ablation_*/* outputs/voxelkp_small/* \
        --metric keypoints.MPJPE --metric keypoints.OKS_AP --metric detection.LEVEL_1.AP_L1/Pedestrian

Each folder is a finished ``tools/train.py`` run (its ``metrics.json`` and ``.hydra/config.yaml``);
runs with the same ``name`` (the model or experiment) are one row, labelled with their
``trainer.seed`` values (grouping assumes runs of one name differ only in their seed). Prints a
Markdown table of ``mean ± std (low–high)`` per metric (sample standard deviation over the runs;
``n=`` where fewer runs measured it). Bad input is one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from voxsparse.evaluation.run_summary import markdown, read_run, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders of tools/train.py")
    parser.add_argument("--metric", action="append", required=True,
                        help="a metrics.json entry, nested names joined by dots (repeat for more columns)")
    parser.add_argument("--digits", type=int, default=3)
    args = parser.parse_args()
    if args.digits < 0:
        parser.error(f"--digits must be >= 0, got {args.digits}")
    try:
        runs = [read_run(folder) for folder in args.runs]
        table = summarize(runs, args.metric)
    except ValueError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
    print(markdown(table, runs, args.digits))


if __name__ == "__main__":
    main()
