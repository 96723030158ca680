"""Write a tiny KITTI object-detection root in the dataset's own formats, for tests.

``velodyne/<id>.bin`` float32 (x, y, z, reflectance) records, ``calib/<id>.txt`` with the seven
``key: values`` lines KITTI writes (realistic matrices: a recording day's calibration), ``label_2/<id>.txt``
with 15 fields a line and two decimals, ``image_2/<id>.png`` a valid black PNG of the frame's size,
``ImageSets/<split>.txt``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from voxsparse.data.kitti import KittiObjects, format_labels

#: A calibration file as KITTI writes them (P0..P3, R0_rect, Tr_velo_to_cam, Tr_imu_to_velo; blank last line).
CALIB_TEXT = """P0: 7.070493000000e+02 0.000000000000e+00 6.040814000000e+02 0.000000000000e+00 0.000000000000e+00 7.070493000000e+02 1.805066000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 0.000000000000e+00
P1: 7.070493000000e+02 0.000000000000e+00 6.040814000000e+02 -3.797842000000e+02 0.000000000000e+00 7.070493000000e+02 1.805066000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 0.000000000000e+00
P2: 7.070493000000e+02 0.000000000000e+00 6.040814000000e+02 4.575831000000e+01 0.000000000000e+00 7.070493000000e+02 1.805066000000e+02 -3.454157000000e-01 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 4.981016000000e-03
P3: 7.070493000000e+02 0.000000000000e+00 6.040814000000e+02 -3.341081000000e+02 0.000000000000e+00 7.070493000000e+02 1.805066000000e+02 2.330660000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 3.201153000000e-03
R0_rect: 9.999128000000e-01 1.009263000000e-02 -8.511932000000e-03 -1.012729000000e-02 9.999406000000e-01 -4.037671000000e-03 8.470675000000e-03 4.123522000000e-03 9.999556000000e-01
Tr_velo_to_cam: 6.927964000000e-03 -9.999722000000e-01 -2.757829000000e-03 -2.457729000000e-02 -1.162982000000e-03 2.749836000000e-03 -9.999955000000e-01 -6.127237000000e-02 9.999753000000e-01 6.931141000000e-03 -1.143899000000e-03 -3.321029000000e-01
Tr_imu_to_velo: 9.999976000000e-01 7.553071000000e-04 -2.035826000000e-03 -8.086759000000e-01 -7.854027000000e-04 9.998898000000e-01 -1.482298000000e-02 3.195559000000e-01 2.024406000000e-03 1.482454000000e-02 9.998881000000e-01 -7.997231000000e-01

"""

IMAGE_SHAPE = (370, 1224)  # (height, width), one of the sizes of KITTI's images


def png_bytes(height: int, width: int) -> bytes:
    """A valid black 8-bit RGB PNG of the given size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"".join(b"\x00" + bytes(3 * width) for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_frame(
    root: Path,
    frame_id: str,
    points: np.ndarray,
    objects: KittiObjects | None,
    folder: str = "training",
    image_shape: tuple[int, int] = IMAGE_SHAPE,
    calib_text: str = CALIB_TEXT,
) -> None:
    """One frame's files under ``root/folder``; ``objects`` None writes no label file."""
    base = Path(root) / folder
    for sub in ("velodyne", "calib", "image_2", "label_2"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    np.asarray(points, dtype="<f4").tofile(base / "velodyne" / f"{frame_id}.bin")
    (base / "calib" / f"{frame_id}.txt").write_text(calib_text)
    (base / "image_2" / f"{frame_id}.png").write_bytes(png_bytes(*image_shape))
    if objects is not None:
        (base / "label_2" / f"{frame_id}.txt").write_text(format_labels(objects))


def write_splits(root: Path, splits: Mapping[str, Sequence[str]]) -> None:
    (Path(root) / "ImageSets").mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (Path(root) / "ImageSets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
