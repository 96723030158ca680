"""Convert a raw dataset into the prepared layout (``voxsparse.data.prepared``) and build the GT
database of its training split. Parallel over ``--workers`` processes or a Ray cluster
(``--executor ray``), resumable: rerun the same
command after an interruption and finished work is skipped.

    python tools/prepare_data.py nuscenes --root data/nuscenes --version v1.0-mini \\
        --out data/prepared/nuscenes --sweeps 10 --workers 4
    python tools/prepare_data.py waymo --root data/waymo/raw --out data/prepared/waymo --workers 4
    python tools/prepare_data.py my_package.my_dataset --root ... --out ...

The first argument names the dataset module: a module of ``voxsparse.data`` by its name (nuscenes,
waymo), else any importable module by its (dotted) name. The module gives its own options
(``add_prepare_arguments``) and the splits to prepare (``preparation_splits``; see
``voxsparse.data.prepared.PreparationSplit``). ``DATASET --help`` lists a dataset's options.

nuScenes splits are the devkit's (``train``/``val`` for v1.0-trainval, ``mini_train``/``mini_val``
for v1.0-mini, ``test`` for v1.0-test; ``--splits`` also takes custom splits of
``<root>/<version>/splits.json``). Waymo splits are the folders ``training``, ``validation`` and
``testing`` under ``--root``, prepared as ``train``, ``val`` and ``test``. See data/README.md.
"""

from __future__ import annotations

import sys

from voxsparse.data.preparation import main

if __name__ == "__main__":
    main(sys.argv[1:], description=__doc__)
