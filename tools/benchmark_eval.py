"""Time the Waymo detection metric on a synthetic workload of many frames.

    python tools/benchmark_eval.py                          # 5,000 frames x 100 predictions x 100 GT
    python tools/benchmark_eval.py --frames 500 --repeats 1 --json eval_bench.json

Each frame holds ``--boxes`` GT boxes (60 % vehicles, 30 % pedestrians, 10 % cyclists, centres
uniform in +-75 m, a third LEVEL_2) and ``--boxes`` predictions: 80 % noisy copies of GT boxes
(centre noise 0.05 x the object's length, 5 % size noise, heading noise 0.2 rad, a few flipped)
and 20 % false positives at random places; scores are higher for the copies. The timed call is
:func:`voxsparse.evaluation.detection.evaluate_detection_levels` (both levels, range breakdowns,
from the per-frame inputs to the metrics); the median of ``--repeats`` runs after ``--warmup`` is
reported, with the process's peak resident memory (workload included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from voxsparse.benchmark.eval_speed import measure_eval_speed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--boxes", type=int, default=100, help="GT boxes and predictions per frame")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="where IoUs are computed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    result = measure_eval_speed(args.frames, args.boxes, args.repeats, args.warmup, args.threads, args.device,
                                args.seed)
    print(result.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=2)


if __name__ == "__main__":
    main()
