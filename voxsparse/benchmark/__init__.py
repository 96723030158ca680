"""Speed measurements behind ``tools/benchmark.py``, ``tools/openpcdet_ref.py`` and ``tools/benchmark_eval.py``.

- :mod:`~voxsparse.benchmark.inputs`: benchmark inputs: synthetic scans cut to a point or voxel
  count, a frames file reused across runs.
- :mod:`~voxsparse.benchmark.stages`: a detector built from its config, its stages timed one by
  one, a profiler trace of its backbone.
- :mod:`~voxsparse.benchmark.openpcdet`: OpenPCDet's VoxelNeXt and DSVT loaded from a checkout by
  path (optional: nothing here imports it until asked).
- :mod:`~voxsparse.benchmark.compare`: ours beside OpenPCDet's on the same input, timed in alternation.
- :mod:`~voxsparse.benchmark.detector_speed`: the whole detector benchmark (options in, JSON-ready
  result and its table out).
- :mod:`~voxsparse.benchmark.eval_speed`: the Waymo detection metric timed on a synthetic workload.

Timings come from :mod:`voxsparse.utils.timing`.
"""
