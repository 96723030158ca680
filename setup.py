"""voxsparse: fully sparse 3D LiDAR perception (VoxelNeXt, DSVT, VoxelKP) in PyTorch."""

from pathlib import Path

from setuptools import find_packages, setup

# The official nuScenes metrics; the test extra carries it so CI runs the devkit-backed tests. Its
# `from nuscenes import NuScenes` imports cv2 (opencv-python-headless, ~50 MB) and scikit-learn.
NUSCENES_DEVKIT = "nuscenes-devkit==1.2.0"
# The devkit's tracking evaluation (AMOTA, MOTA, IDS) counts with py-motmetrics and pandas, which the
# devkit does not require. motmetrics 1.4.0 is the devkit's own pin (requirements_tracking.txt);
# motmetrics<=1.1.3 (its old pin) imports collections.Iterable and fails on Python >= 3.10.
NUSCENES_TRACKING = ["motmetrics==1.4.0", "pandas>=1.5,<3"]

# The sparse backend is an extra so a CUDA user can pick the wheel matching their toolkit.
# `cpu` also pins torch 2.13.0, whose CPU build pip takes where a CPU wheel is offered (a local
# wheel, PyTorch's CPU index); an unpinned torch would upgrade a user's own build.
EXTRAS = {
    "cpu": ["torch==2.13.0", "spconv==2.3.8"],
    "cu120": ["spconv-cu120==2.3.8"],
    "cu126": ["spconv-cu126==2.3.8"],
    "triton": ["spconv-triton>=1.0"],
    # libusb-package: the libusb-1.0.so.0 the open3d wheel links but does not ship (viz/open3d_loader.py).
    "viz": ["open3d>=0.20", "libusb-package>=1.0.30", "matplotlib>=3.7", "imageio>=2.30",
            "imageio-ffmpeg>=0.5"],
    "nuscenes": [NUSCENES_DEVKIT, *NUSCENES_TRACKING],
    # Waymo TFRecords: CRC32C (google-crc32c, a 37 KB wheel) and protobuf for the official protos, which
    # come from `pip install --no-deps waymo-open-dataset-tf-2-12-0==1.6.7`: with its dependencies that
    # wheel pins numpy==1.23.5 and TensorFlow 2.13, which pip cannot install beside numpy>=1.24.
    "waymo": ["google-crc32c>=1.5", "protobuf>=4.21"],
    # Waymo v2 parquet components (voxsparse.data.waymo.v2): pyarrow, not the official wheel; the waymo
    # extra's packages because the voxsparse.data.waymo package imports them. pyarrow >= 23 needs numpy 2.
    "waymo-v2": ["pyarrow>=14,<23", "google-crc32c>=1.5", "protobuf>=4.21"],
    # Argoverse 2 (voxsparse.data.argo2, voxsparse.evaluation.argo2): the official av2 package reads the
    # feather files and computes the detection metric. Its dependencies would take numpy 2 and a
    # pyarrow that needs it; numpy and pyarrow are pinned beside it so pip keeps numpy 1.
    "argo2": ["av2==0.3.6", "numpy>=1.24,<2", "pyarrow>=14,<23"],
    # Dataset preparation on a Ray cluster (tools/prepare_data.py --executor ray); on every node.
    "ray": ["ray>=2.9"],
    # ONNX export and its check (tools/export.py format=onnx): torch.onnx's exporter needs onnxscript.
    "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"],
    # Recorded drives (ROS 1/ROS 2 bags, MCAP) read and written without a ROS installation.
    "bags": ["rosbags>=0.10", "mcap>=1.2"],
    # CI runs the readers, metrics and executors of every dataset, so the test extra carries their
    # packages (the Waymo protos excepted: see the waymo extra).
    "test": ["pytest>=8", "shapely>=2.0", NUSCENES_DEVKIT, *NUSCENES_TRACKING, "google-crc32c>=1.5", "protobuf>=4.21",
             "pyarrow>=14,<23", "ray>=2.9", "av2==0.3.6", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2",
             "rosbags>=0.10", "mcap>=1.2"],
}

setup(
    name="voxsparse",
    version="0.1.0",
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["voxsparse", "voxsparse.*"]),
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24,<2",
        "scipy>=1.10",  # Hungarian matching in the keypoint metrics
        "hydra-core>=1.3",
        "tqdm>=4.60",
        "tensorboard>=2.12",
    ],
    extras_require=EXTRAS,
)
