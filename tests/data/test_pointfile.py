"""Point files read the way a user meets them: files written to disk (by hand following the PCD v0.7
and PLY 1.0 specifications, or by Open3D where it imports), then read back."""

from __future__ import annotations

import logging
import pickle
import struct
import sys

import numpy as np
import pytest

from voxsparse.data.pointfile import (
    POINT_FORMATS,
    PointCloud,
    PointFileError,
    conform,
    feature_mismatch,
    read_points,
)
from voxsparse.structures import PointConvention

KITTI = PointConvention(("x", "y", "z", "intensity"), "unit")
NUSCENES = PointConvention(("x", "y", "z", "intensity", "time_lag"), "uint8")
WAYMO = PointConvention(("x", "y", "z", "intensity", "elongation"), "waymo")


def _cloud(n: int, columns: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-50, 50, size=(n, columns)).astype(np.float32)
    if columns > 3:
        pts[:, 3] = rng.integers(0, 256, n)  # 0-255 intensity
    return pts


@pytest.fixture
def o3d():
    """Open3D (through voxsparse's loader), or a skip saying why it cannot be imported here."""
    from voxsparse.viz.open3d_loader import import_open3d, open3d_import_status

    ok, reason = open3d_import_status()
    if not ok:
        pytest.skip(reason)
    return import_open3d()


# --------------------------------------------------------------------------------------------
# .bin


def test_nuscenes_pcd_bin_reads_five_columns(tmp_path, caplog):
    pts = _cloud(8, 5)  # 160 bytes: a whole number of both 16- and 20-byte records
    pts[:, 4] = np.arange(8) % 32  # ring index
    pts.tofile(tmp_path / "n015-LIDAR_TOP.pcd.bin")
    with caplog.at_level(logging.INFO, logger="voxsparse.data.pointfile"):
        cloud = read_points(tmp_path / "n015-LIDAR_TOP.pcd.bin")
    assert "format=nuscenes" in caplog.text
    assert cloud.features == ("x", "y", "z", "intensity", "ring") and cloud.intensity == "uint8"
    np.testing.assert_array_equal(cloud.points, pts)
    assert cloud.points.dtype == np.float32 and cloud.points.flags.c_contiguous and len(cloud) == 8

    pts.tofile(tmp_path / "scan.bin")  # the same bytes without the telling name: ambiguous
    with pytest.raises(PointFileError) as err:
        read_points(tmp_path / "scan.bin")
    message = str(err.value)
    assert "scan.bin" in message and "160 bytes" in message
    assert "format=kitti|xyzi (4 float32 columns, 10 points)" in message
    assert "format=nuscenes (5 float32 columns, 8 points)" in message
    assert "format=<name> or columns=<N>" in message
    np.testing.assert_array_equal(read_points(tmp_path / "scan.bin", format="nuscenes").points, pts)
    generic = read_points(tmp_path / "scan.bin", columns=5)
    assert generic.features == ("x", "y", "z", "intensity", "feature_4") and generic.intensity is None
    assert read_points(tmp_path / "scan.bin", format="kitti").points.shape == (10, 4)  # asked for: done
    with pytest.raises(PointFileError, match="not both"):
        read_points(tmp_path / "scan.bin", format="nuscenes", columns=5)


def test_bin_layout_inferred_when_one_width_fits(tmp_path, caplog):
    pts = _cloud(7, 4)  # 112 bytes: only 16-byte records fit
    pts.tofile(tmp_path / "000042.bin")
    with caplog.at_level(logging.INFO, logger="voxsparse.data.pointfile"):
        cloud = read_points(tmp_path / "000042.bin")
    assert "format=xyzi" in caplog.text and "000042.bin" in caplog.text
    assert cloud.features == ("x", "y", "z", "intensity") and cloud.intensity is None  # scale unknown
    np.testing.assert_array_equal(cloud.points, pts)
    assert read_points(tmp_path / "000042.bin", format="kitti").intensity == "unit"
    _cloud(7, 3).tofile(tmp_path / "xyz.bin")  # 84 bytes: only 12
    assert read_points(tmp_path / "xyz.bin").features == ("x", "y", "z")
    with pytest.raises(
        PointFileError,
        match=r"112 bytes is 4 records of 24 bytes \(format=waymo, 6 float32 columns\) plus 16 trailing",
    ):
        read_points(tmp_path / "000042.bin", format="waymo")


def test_kitti_velodyne_folder_reads_four_columns(tmp_path, caplog):
    pts = _cloud(15, 4)  # 240 bytes: a whole number of 12-, 16-, 20- and 24-byte records
    folder = tmp_path / "training" / "velodyne"
    folder.mkdir(parents=True)
    pts.tofile(folder / "000008.bin")
    with caplog.at_level(logging.INFO, logger="voxsparse.data.pointfile"):
        cloud = read_points(folder / "000008.bin")
    assert "format=kitti" in caplog.text and "velodyne" in caplog.text
    assert cloud.intensity == "unit"
    np.testing.assert_array_equal(cloud.points, pts)
    pts.tofile(tmp_path / "000008.bin")  # outside KITTI's layout: ambiguous
    with pytest.raises(PointFileError, match="format=xyz .* and format=waymo"):
        read_points(tmp_path / "000008.bin")


def test_bin_trailing_bytes_are_refused(tmp_path):
    pts = _cloud(5, 4)
    (tmp_path / "a.bin").write_bytes(pts.tobytes() + b"\0\0")  # half a float32 more
    with pytest.raises(
        PointFileError, match=r"a\.bin: 82 bytes is 5 records of 16 bytes .* plus 2 trailing bytes"
    ):
        read_points(tmp_path / "a.bin", format="kitti")
    (tmp_path / "b.bin").write_bytes(pts.tobytes() + b"\0" * 4)  # a whole float32 more
    with pytest.raises(PointFileError, match="4 trailing bytes"):
        read_points(tmp_path / "b.bin", columns=4)
    with pytest.raises(PointFileError, match=r"84 bytes is 3 records of 24 bytes .* 12 trailing bytes"):
        read_points(tmp_path / "b.bin", format="waymo")
    (tmp_path / "c.pcd.bin").write_bytes(_cloud(3, 5).tobytes() + b"\0" * 8)
    with pytest.raises(PointFileError, match="8 trailing bytes"):
        read_points(tmp_path / "c.pcd.bin")
    (tmp_path / "d.bin").write_bytes(_cloud(7, 4).tobytes() + b"\0\0")  # 114 bytes: no width fits
    with pytest.raises(PointFileError, match=r"114 bytes is no whole number .*2 after 16-byte records"):
        read_points(tmp_path / "d.bin")


def test_empty_bin_is_an_empty_cloud(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    cloud = read_points(tmp_path / "empty.bin")
    assert cloud.points.shape == (0, 3) and cloud.points.dtype == np.float32
    assert conform(cloud, KITTI).shape == (0, 4)
    assert feature_mismatch(conform(cloud, KITTI), KITTI) is None
    nus = read_points(tmp_path / "empty.bin", format="nuscenes")
    assert nus.points.shape == (0, 5)
    assert conform(nus, NUSCENES).shape == (0, 5)
    (tmp_path / "empty.pcd.bin").write_bytes(b"")
    assert read_points(tmp_path / "empty.pcd.bin").features[-1] == "ring"


def test_nonfinite_rows(tmp_path):
    pts = _cloud(1000, 4)
    pts[3, 0], pts[7, 2], pts[500, 3] = np.nan, np.inf, -np.inf
    pts.tofile(tmp_path / "a.bin")
    with pytest.raises(PointFileError, match=r"a\.bin: 3 of 1,000 rows hold NaN/inf \(first at row 3\)"):
        read_points(tmp_path / "a.bin", format="kitti")
    with pytest.warns(UserWarning, match="dropped 3 of 1,000 rows with NaN/inf"):
        cloud = read_points(tmp_path / "a.bin", format="kitti", nonfinite="drop")
    np.testing.assert_array_equal(cloud.points, np.delete(pts, [3, 7, 500], axis=0))
    with pytest.raises(PointFileError, match="nonfinite"):
        read_points(tmp_path / "a.bin", format="kitti", nonfinite="keep")


# --------------------------------------------------------------------------------------------
# .npy


def test_npy_arrays(tmp_path):
    pts = _cloud(50, 6).astype(np.float64)
    np.save(tmp_path / "waymo.npy", pts)
    cloud = read_points(tmp_path / "waymo.npy", format="waymo")
    assert (
        cloud.features == ("x", "y", "z", "intensity", "elongation", "nlz_flag")
        and cloud.intensity == "waymo"
    )
    np.testing.assert_array_equal(cloud.points, pts.astype(np.float32))
    generic = read_points(tmp_path / "waymo.npy")
    assert (
        generic.features == ("x", "y", "z", "intensity", "feature_4", "feature_5")
        and generic.intensity is None
    )
    with pytest.raises(PointFileError, match="format=waymo"):  # the model's feature is not in a generic file
        conform(generic, WAYMO)
    np.testing.assert_array_equal(conform(cloud, WAYMO)[:, 4], pts[:, 4].astype(np.float32))
    with pytest.raises(PointFileError, match=r"6 columns but format=nuscenes has 5"):
        read_points(tmp_path / "waymo.npy", format="nuscenes")
    with pytest.raises(PointFileError, match="not columns=4"):
        read_points(tmp_path / "waymo.npy", columns=4)

    big = pts.copy()
    big[9, 1] = 1e39  # finite in float64, inf in float32
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(PointFileError, match=r"big\.npy: .*1 values beyond the float32 range .*row 9"):
        read_points(tmp_path / "big.npy")
    np.save(tmp_path / "ints.npy", np.arange(12, dtype=np.int16).reshape(4, 3))
    assert read_points(tmp_path / "ints.npy").points.dtype == np.float32
    np.save(tmp_path / "flat.npy", pts[:, 0])
    with pytest.raises(PointFileError, match=r"\(N, C >= 3\).*shape \(50,\)"):
        read_points(tmp_path / "flat.npy")
    np.save(tmp_path / "obj.npy", np.array([[1, "a", None]], dtype=object), allow_pickle=True)
    with pytest.raises(PointFileError, match=r"obj\.npy"):
        read_points(tmp_path / "obj.npy")
    np.save(tmp_path / "cplx.npy", np.ones((3, 3), np.complex64))
    with pytest.raises(PointFileError, match="real numbers"):
        read_points(tmp_path / "cplx.npy")

    table = np.zeros(4, dtype=[("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("t", "<f8"), ("intensity", "u1")])
    table["x"], table["intensity"] = [1, 2, 3, 4], [0, 10, 200, 255]
    np.save(tmp_path / "table.npy", table)
    cloud = read_points(tmp_path / "table.npy")
    assert cloud.features == ("x", "y", "z", "intensity") and cloud.intensity == "uint8"
    np.testing.assert_array_equal(cloud.points[:, 3], [0, 10, 200, 255])
    np.save(tmp_path / "noz.npy", np.zeros(4, dtype=[("x", "<f4"), ("y", "<f4")]))
    with pytest.raises(PointFileError, match=r"named 'z'; the file has x, y"):
        read_points(tmp_path / "noz.npy")


# --------------------------------------------------------------------------------------------
# .pcd, written by hand (PCD v0.7)


def _pcd(fields, sizes, types, counts, points, data_kind, body, width=None, height=1) -> bytes:
    width = points if width is None else width
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\n"
        "VERSION 0.7\n"
        f"FIELDS {' '.join(fields)}\nSIZE {' '.join(map(str, sizes))}\nTYPE {' '.join(types)}\n"
        f"COUNT {' '.join(map(str, counts))}\nWIDTH {width}\nHEIGHT {height}\n"
        f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {points}\nDATA {data_kind}\n"
    )
    return header.encode("ascii") + body


def _lzf_literals(raw: bytes) -> bytes:
    """A valid LZF stream of literal runs only (no compression)."""
    out = bytearray()
    for start in range(0, len(raw), 32):
        chunk = raw[start : start + 32]
        out += bytes([len(chunk) - 1]) + chunk
    return bytes(out)


def _compressed_body(columns: list[bytes], stream: bytes | None = None) -> bytes:
    raw = b"".join(columns)  # binary_compressed stores one block per field
    stream = _lzf_literals(raw) if stream is None else stream
    return struct.pack("<II", len(stream), len(raw)) + stream


# A PCL-style cloud: float xyz, uint8 intensity, uint16 ring, a 3-vector normal, and padding.
_RICH = np.dtype(
    [
        ("x", "<f4"),
        ("y", "<f4"),
        ("z", "<f4"),
        ("intensity", "u1"),
        ("ring", "<u2"),
        ("normal", "<f4", (3,)),
        ("pad", "u1", (3,)),
    ]
)
_RICH_HEADER = (
    ["x", "y", "z", "intensity", "ring", "normal", "_"],
    [4, 4, 4, 1, 2, 4, 1],
    list("FFFUUFU"),
    [1, 1, 1, 1, 1, 3, 3],
)


def _rich_points(n: int) -> np.ndarray:
    table = np.zeros(n, _RICH)
    pts = _cloud(n, 3, seed=3)
    table["x"], table["y"], table["z"] = pts.T
    table["intensity"] = np.arange(n) * 7 % 256
    table["ring"] = np.arange(n) % 32
    table["normal"] = 0.5
    return table


def _check_rich(cloud: PointCloud, table: np.ndarray) -> None:
    assert cloud.features == ("x", "y", "z", "intensity") and cloud.intensity == "uint8"
    np.testing.assert_array_equal(cloud.points[:, 0], table["x"])
    np.testing.assert_array_equal(cloud.points[:, 2], table["z"])
    np.testing.assert_array_equal(cloud.points[:, 3], table["intensity"])


def _assert_refused(tmp_path, cases: dict[str, tuple[bytes, str]]) -> None:
    """Each file (name: (content, message pattern)) is refused with a message naming it."""
    for name, (content, pattern) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PointFileError, match=pattern) as err:
            read_points(tmp_path / name)
        assert name in str(err.value)


def test_pcd_by_hand_binary_ascii_compressed(tmp_path):
    table = _rich_points(37)
    (tmp_path / "bin.pcd").write_bytes(_pcd(*_RICH_HEADER, 37, "binary", table.tobytes()))
    _check_rich(read_points(tmp_path / "bin.pcd"), table)
    nus = read_points(tmp_path / "bin.pcd", format="nuscenes")  # a format takes the fields it names
    assert nus.features[-1] == "ring" and nus.intensity == "uint8"
    np.testing.assert_array_equal(nus.points[:, 4], table["ring"])
    with pytest.raises(
        PointFileError, match=r"format=waymo needs a field named 'elongation'; the file has x, y"
    ):
        read_points(tmp_path / "bin.pcd", format="waymo")

    rows = "".join(f"{r[0]!r} {r[1]!r} {r[2]!r} {r[3]} {r[4]} 0.5 0.5 0.5 0 0 0\n" for r in table.tolist())
    (tmp_path / "ascii.pcd").write_bytes(_pcd(*_RICH_HEADER, 37, "ascii", rows.encode()))
    _check_rich(read_points(tmp_path / "ascii.pcd"), table)

    blocks = [np.ascontiguousarray(table[name]).tobytes() for name in _RICH.names]
    (tmp_path / "lzf.pcd").write_bytes(_pcd(*_RICH_HEADER, 37, "binary_compressed", _compressed_body(blocks)))
    _check_rich(read_points(tmp_path / "lzf.pcd"), table)

    # organised 2 x 3 cloud, float64 coordinates, no intensity: x = 1.0 everywhere, compressed with
    # back references (one overlapping: it copies its own output), as liblzf writes them
    x = struct.pack("<d", 1.0) * 6
    yz = np.arange(12, dtype="<f8").tobytes()
    stream = (
        bytes([7]) + x[:8] + bytes([0xE0, 31, 7]) + _lzf_literals(yz)
    )  # 8 literals, then 40 bytes from 8 back
    (tmp_path / "organised.pcd").write_bytes(
        _pcd(
            ["x", "y", "z"],
            [8, 8, 8],
            "FFF",
            [1, 1, 1],
            6,
            "binary_compressed",
            _compressed_body([x, yz], stream),
            width=3,
            height=2,
        )
    )
    cloud = read_points(tmp_path / "organised.pcd")
    assert cloud.features == ("x", "y", "z") and cloud.intensity is None
    np.testing.assert_array_equal(cloud.points, np.c_[np.ones(6), np.arange(6), np.arange(6, 12)])


def test_pcd_header_lies(tmp_path):
    table = _rich_points(10)
    f, s, t, c = _RICH_HEADER
    cases = {
        "short.pcd": (
            _pcd(f, s, t, c, 1000, "binary", table.tobytes()),
            (
                r"declares 1,000 points \(30,000 bytes of 30-byte records\) but the binary data holds 300 bytes "
                r"\(10 points\)"
            ),
        ),
        "long.pcd": (_pcd(f, s, t, c, 9, "binary", table.tobytes()), "30 bytes follow the 9 points"),
        "size.pcd": (
            _pcd(f, s, t, c, 10, "binary", table.tobytes(), width=5),
            r"WIDTH 5 x HEIGHT 1 = 5 != POINTS 10",
        ),
        "fields.pcd": (
            _pcd(f, s[:-1], t, c, 10, "binary", table.tobytes()),
            "SIZE has 6 entries for 7 FIELDS",
        ),
        "type.pcd": (_pcd(f, s, t[:-1] + ["X"], c, 10, "binary", table.tobytes()), "TYPE X SIZE 1"),
        "data.pcd": (_pcd(f, s, t, c, 10, "binary_packed", table.tobytes()), "binary_packed"),
        "ascii_rows.pcd": (
            _pcd(["x", "y", "z"], [4] * 3, "FFF", [1] * 3, 3, "ascii", b"1 2 3\n4 5 6\n"),
            "declares 3 points but the ascii data holds 2 rows",
        ),
        "ascii_cols.pcd": (
            _pcd(["x", "y", "z"], [4] * 3, "FFF", [1] * 3, 2, "ascii", b"1 2 3\n4 5\n"),
            "row 1 has 2 values but FIELDS/COUNT declare 3",
        ),
        "ascii_word.pcd": (
            _pcd(["x", "y", "z"], [4] * 3, "FFF", [1] * 3, 1, "ascii", b"1 2 three\n"),
            "'three' is not a number",
        ),
        "ascii_u1.pcd": (
            _pcd(["x", "y", "z", "i"], [4, 4, 4, 1], "FFFU", [1] * 4, 1, "ascii", b"1 2 3 300\n"),
            "'i' row 0: .300.0. is no uint8 value",
        ),
        "lzf_size.pcd": (
            _pcd(
                ["x", "y", "z"],
                [4] * 3,
                "FFF",
                [1] * 3,
                2,
                "binary_compressed",
                _compressed_body([b"\0" * 12]),
            ),
            "unpacks to 12 bytes but the header declares 2 points",
        ),
        "lzf_ref.pcd": (
            _pcd(
                ["x", "y", "z"],
                [4] * 3,
                "FFF",
                [1] * 3,
                1,
                "binary_compressed",
                struct.pack("<II", 3, 12) + bytes([0x20, 5, 0]),
            ),
            "corrupt: a back reference",
        ),
        "nodata.pcd": (b"VERSION 0.7\nFIELDS x y z\n", "no DATA line"),
        "text.pcd": (b"hello world\n", "unknown entry 'hello world'"),
    }
    _assert_refused(tmp_path, cases)


# --------------------------------------------------------------------------------------------
# .ply, written by hand (PLY 1.0)


def _ply(encoding: str, elements: list[tuple[str, int, list[str]]], body: bytes) -> bytes:
    lines = ["ply", f"format {encoding} 1.0", "comment written by hand"]
    for name, count, properties in elements:
        lines.append(f"element {name} {count}")
        lines += [f"property {p}" for p in properties]
    return ("\n".join(lines + ["end_header"]) + "\n").encode("ascii") + body


_VERTEX = ["float x", "float y", "float z", "uchar intensity", "double t"]
_FACE = ["list uchar int vertex_indices"]


def _vertex_rows(n: int, endian: str) -> tuple[np.ndarray, bytes]:
    table = np.zeros(
        n,
        [
            ("x", endian + "f4"),
            ("y", endian + "f4"),
            ("z", endian + "f4"),
            ("intensity", "u1"),
            ("t", endian + "f8"),
        ],
    )
    pts = _cloud(n, 3, seed=5)
    table["x"], table["y"], table["z"] = pts.T
    table["intensity"] = np.arange(n) * 9 % 256
    table["t"] = 0.25
    return table, table.tobytes()


def _faces(endian: str, lists: list[list[int]]) -> bytes:
    return b"".join(struct.pack(f"{endian}B{len(v)}i", len(v), *v) for v in lists)


def test_ply_by_hand(tmp_path):
    for encoding, endian in (("binary_little_endian", "<"), ("binary_big_endian", ">")):
        table, body = _vertex_rows(11, endian)
        mixed = [[0, 1, 2], [0, 1, 2, 3], [4, 5, 6]]  # triangles and a quad: lists of varying length
        # faces before the vertices, and faces after them
        (tmp_path / f"{endian}.ply").write_bytes(
            _ply(
                encoding,
                [("face", 3, _FACE), ("vertex", 11, _VERTEX), ("edge", 2, _FACE)],
                _faces(endian, mixed) + body + _faces(endian, [[0, 1], [1, 2]]),
            )
        )
        cloud = read_points(tmp_path / f"{endian}.ply")
        assert cloud.features == ("x", "y", "z", "intensity") and cloud.intensity == "uint8"
        np.testing.assert_array_equal(cloud.points[:, 1], table["y"].astype(np.float32))
        np.testing.assert_array_equal(cloud.points[:, 3], table["intensity"])

    table, _ = _vertex_rows(4, "<")
    rows = "".join(f"{r[0]!r} {r[1]!r} {r[2]!r} {r[3]} 0.25\n" for r in table.tolist())
    faces = "3 0 1 2\n4 0 1 2 3\n"
    triangles = "3 0 1 2\n3 1 2 3\n"
    (tmp_path / "ascii.ply").write_bytes(
        _ply(
            "ascii",
            [("face", 2, _FACE), ("vertex", 4, _VERTEX), ("triangle", 2, _FACE)],
            (faces + rows + triangles).encode(),
        )
    )
    cloud = read_points(tmp_path / "ascii.ply")
    np.testing.assert_array_equal(cloud.points, np.c_[table["x"], table["y"], table["z"], table["intensity"]])
    assert cloud.intensity == "uint8"
    (tmp_path / "float_i.ply").write_bytes(
        _ply(
            "ascii",
            [("vertex", 2, ["float x", "float y", "float z", "float reflectance"])],
            b"0 0 0 0.5\n1 1 1 0.25\n",
        )
    )
    cloud = read_points(tmp_path / "float_i.ply", format="kitti")
    assert cloud.intensity == "unit" and cloud.points[:, 3].tolist() == [0.5, 0.25]
    assert read_points(tmp_path / "float_i.ply").intensity is None

    # a vertex element with a list property between its coordinates
    listed = ["float x", "list uchar float extra", "float y", "float z"]
    body = b"".join(
        struct.pack(f"<fB{k}fff", i, k, *([9.0] * k), 10 + i, 20 + i) for i, k in enumerate((0, 2, 1))
    )
    (tmp_path / "listed.ply").write_bytes(_ply("binary_little_endian", [("vertex", 3, listed)], body))
    expected = [[0, 10, 20], [1, 11, 21], [2, 12, 22]]
    np.testing.assert_array_equal(read_points(tmp_path / "listed.ply").points, expected)
    (tmp_path / "listed_ascii.ply").write_bytes(
        _ply("ascii", [("vertex", 3, listed)], b"0 0 10 20\n1 2 9 9 11 21\n2 1 9 12 22\n")
    )
    np.testing.assert_array_equal(read_points(tmp_path / "listed_ascii.ply").points, expected)


def test_ply_header_lies(tmp_path):
    _, body = _vertex_rows(10, "<")
    xyz = _cloud(10, 3).tobytes()
    ascii_rows = "".join("1 2 3 4 0.5\n" for _ in range(10)).encode()
    le = "binary_little_endian"
    cases = {
        "million.ply": (
            _ply(le, [("vertex", 1_000_000, _VERTEX)], body),
            (
                r"element 'vertex' declares 1,000,000 records \(21,000,000 bytes of 21\) but 210 bytes "
                r"remain \(10 records\)"
            ),
        ),
        "million_ascii.ply": (
            _ply("ascii", [("vertex", 1_000_000, _VERTEX)], ascii_rows),
            "declares 1,000,000 rows but the data holds 10",
        ),
        "rows.ply": (
            _ply(le, [("vertex", 10, _VERTEX)], xyz + b"\0" * 50),  # 12-byte rows, 21-byte properties
            "declares 10 records .* but 170 bytes remain",
        ),
        "rows_ascii.ply": (
            _ply("ascii", [("vertex", 2, _VERTEX)], b"1 2 3\n4 5 6\n"),
            "row 0 has 3 values but its properties declare 5",
        ),
        "trailing.ply": (
            _ply(le, [("vertex", 10, _VERTEX)], body + b"\0" * 3),
            "3 bytes follow the declared PLY",
        ),
        "trailing_ascii.ply": (
            _ply("ascii", [("vertex", 9, _VERTEX)], ascii_rows),
            "1 rows follow the declared PLY elements",
        ),
        "faces_short.ply": (
            _ply(le, [("vertex", 10, _VERTEX), ("face", 3, _FACE)], body + _faces("<", [[0, 1, 2]])),
            "element 'face' declares 3 records but the data ends in record 1",
        ),
        "faces_ascii.ply": (
            _ply("ascii", [("face", 1, _FACE), ("vertex", 10, _VERTEX)], b"3 0 1\n" + ascii_rows),
            "element 'face' row 0 has 3 values but its properties and list lengths declare 4",
        ),
        "noxyz.ply": (
            _ply("ascii", [("vertex", 1, ["float x", "float y"])], b"1 2\n"),
            "a vertex property named 'z'; the file has x, y",
        ),
        "novertex.ply": (_ply("ascii", [("face", 1, _FACE)], b"3 0 1 2\n"), "no vertex element"),
        "type.ply": (
            _ply("ascii", [("vertex", 1, ["float128 x"])], b"1\n"),
            "unknown property type 'float128'",
        ),
        "magic.ply": (b"PLY\n", "PLY magic"),
        "noend.ply": (b"ply\nformat ascii 1.0\nelement vertex 1\n", "no end_header"),
    }
    _assert_refused(tmp_path, cases)


def test_pcd_ply_read_without_open3d(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open3d", None)  # any `import open3d` now fails
    table = _rich_points(5)
    (tmp_path / "a.pcd").write_bytes(_pcd(*_RICH_HEADER, 5, "binary", table.tobytes()))
    _check_rich(read_points(tmp_path / "a.pcd"), table)
    _, body = _vertex_rows(5, ">")
    (tmp_path / "a.ply").write_bytes(_ply("binary_big_endian", [("vertex", 5, _VERTEX)], body))
    assert read_points(tmp_path / "a.ply").points.shape == (5, 4)


# --------------------------------------------------------------------------------------------
# .pcd / .ply written by Open3D


def test_open3d_files(tmp_path, o3d):
    pts = _cloud(500, 4, seed=7)
    pts[:, 3] /= 255.0
    cloud = o3d.t.geometry.PointCloud(o3d.core.Tensor(pts[:, :3]))
    cloud.point.intensity = o3d.core.Tensor(pts[:, 3:4])
    for name, options, atol in (
        ("ascii.pcd", {"write_ascii": True}, 1e-5),
        ("binary.pcd", {}, 0),
        ("compressed.pcd", {"compressed": True}, 0),
        ("ascii.ply", {"write_ascii": True}, 1e-4),
        ("binary.ply", {}, 0),
    ):
        assert o3d.t.io.write_point_cloud(str(tmp_path / name), cloud, **options)
        got = read_points(tmp_path / name, format="kitti")
        assert got.features == ("x", "y", "z", "intensity") and got.intensity == "unit"
        np.testing.assert_allclose(got.points, pts, rtol=1e-5, atol=atol, err_msg=name)

    # a regular grid compresses well: LZF back references of every length
    grid = np.stack(np.meshgrid(np.arange(40.0), np.arange(30.0), [0.0, 0.5], indexing="ij"), -1).reshape(
        -1, 3
    )
    legacy = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(grid))
    assert o3d.io.write_point_cloud(str(tmp_path / "grid.pcd"), legacy, write_ascii=False, compressed=True)
    assert (tmp_path / "grid.pcd").stat().st_size < grid.size * 4 / 2
    got = read_points(tmp_path / "grid.pcd")
    assert got.features == ("x", "y", "z")
    np.testing.assert_array_equal(got.points, grid.astype(np.float32))
    assert o3d.io.write_point_cloud(str(tmp_path / "grid.ply"), legacy)  # double properties
    np.testing.assert_array_equal(read_points(tmp_path / "grid.ply").points, grid.astype(np.float32))


# --------------------------------------------------------------------------------------------
# paths and arguments


def test_path_errors(tmp_path):
    with pytest.raises(PointFileError, match=r"missing\.bin: no such file"):
        read_points(tmp_path / "missing.bin")
    (tmp_path / "scans.bin").mkdir()
    with pytest.raises(PointFileError, match=r"scans\.bin: is a directory"):
        read_points(tmp_path / "scans.bin")
    (tmp_path / "a.xyz").write_bytes(b"1 2 3\n")
    with pytest.raises(PointFileError, match=r"a\.xyz: unknown suffix '\.xyz'"):
        read_points(tmp_path / "a.xyz")
    _cloud(7, 4).tofile(tmp_path / "a.bin")
    with pytest.raises(PointFileError, match=r"unknown format='kiti'"):
        read_points(tmp_path / "a.bin", format="kiti")
    with pytest.raises(PointFileError, match="columns must be an integer >= 3"):
        read_points(tmp_path / "a.bin", columns=2)
    (tmp_path / "a.ply").write_bytes(
        _ply("ascii", [("vertex", 1, ["float x", "float y", "float z"])], b"1 2 3\n")
    )
    with pytest.raises(PointFileError, match="columns= applies to .bin and .npy"):
        read_points(tmp_path / "a.ply", columns=3)
    err = PointFileError(tmp_path / "a.bin", "detail")
    assert isinstance(err, ValueError) and str(pickle.loads(pickle.dumps(err))) == str(err)


# --------------------------------------------------------------------------------------------
# model conventions


def test_formats_table():
    assert {f.name: f.record_bytes for f in POINT_FORMATS.values()} == {
        "xyz": 12,
        "xyzi": 16,
        "kitti": 16,
        "nuscenes": 20,
        "waymo": 24,
    }
    assert POINT_FORMATS["nuscenes"].record_dtype.names == ("x", "y", "z", "intensity", "ring")
    assert [POINT_FORMATS[n].intensity for n in ("xyzi", "kitti", "nuscenes", "waymo")] == [
        None,
        "unit",
        "uint8",
        "waymo",
    ]


def _memory(points, features, intensity) -> PointCloud:
    return PointCloud(np.asarray(points, np.float32), features, intensity)


def test_conform_converts_intensity_and_fills_time_lag():
    xyz = [[1, 2, 3], [4, 5, 6]]
    nus = _memory(np.c_[xyz, [0, 255], [5, 6]], POINT_FORMATS["nuscenes"].features, "uint8")
    np.testing.assert_allclose(conform(nus, KITTI), np.c_[xyz, [0, 1]])
    out = conform(nus, NUSCENES)
    np.testing.assert_array_equal(out, np.c_[xyz, [0, 255], [0, 0]])  # ring dropped, time_lag zero
    kitti = _memory(np.c_[xyz, [0.5, 1.0]], ("x", "y", "z", "intensity"), "unit")
    np.testing.assert_allclose(conform(kitti, NUSCENES)[:, 3], [127.5, 255])
    waymo = _memory(np.c_[xyz, [0.3, 4.0], [0.1, 0.2]], ("x", "y", "z", "intensity", "elongation"), "waymo")
    np.testing.assert_allclose(conform(waymo, KITTI)[:, 3], np.tanh([0.3, 4.0]), rtol=1e-6)
    to_waymo = conform(kitti, WAYMO.__class__(("x", "y", "z", "intensity"), "waymo"))
    assert np.all(np.isfinite(to_waymo)) and to_waymo[1, 3] > 8  # 1.0 clipped below 1 before atanh
    np.testing.assert_allclose(np.tanh(to_waymo[:, 3]), [0.5, 1.0], atol=1e-6)
    unknown = _memory(np.c_[xyz, [7, 9]], ("x", "y", "z", "intensity"), None)
    np.testing.assert_array_equal(conform(unknown, KITTI)[:, 3], [7, 9])  # passed through as is
    with pytest.raises(PointFileError, match=r"expects feature 'intensity' .* the file has x, y, z"):
        conform(_memory(xyz, ("x", "y", "z"), None), KITTI)
    with pytest.raises(PointFileError, match=r"expects feature 'elongation'.*format=waymo"):
        conform(kitti, WAYMO)


def test_feature_mismatch():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(1000, 3))
    uint8 = np.round(rng.gamma(2.0, 12.0, 1000).clip(0, 212))
    uint8[:2] = 212, 0
    message = feature_mismatch(np.c_[xyz, uint8], KITTI)
    assert message.startswith("intensity spans 0.0-212.0 (99th percentile ")
    assert message.endswith("but the model expects unit reflectance in [0, 1]")
    unit = rng.uniform(0, 0.99, 1000)
    assert feature_mismatch(np.c_[xyz, unit], KITTI) is None
    assert "0-255 intensity (uint8 scale)" in feature_mismatch(np.c_[xyz, unit, np.zeros(1000)], NUSCENES)
    assert feature_mismatch(np.c_[xyz, uint8, np.zeros(1000)], NUSCENES) is None
    assert "raw Waymo intensity" in feature_mismatch(np.c_[xyz, uint8, np.zeros(1000)], WAYMO)
    assert feature_mismatch(np.c_[xyz, rng.gamma(1.0, 0.3, 1000), np.zeros(1000)], WAYMO) is None
    assert "spans -1" in feature_mismatch(np.c_[xyz, unit - 1], KITTI)
    assert feature_mismatch(np.zeros((0, 4)), KITTI) is None
    assert feature_mismatch(xyz, PointConvention(("x", "y", "z"))) is None
    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        feature_mismatch(xyz, KITTI)

    # the whole road: a nuScenes file, read, conformed to a KITTI-trained model, checked
    pts = _cloud(64, 5)
    cloud = _memory(pts, POINT_FORMATS["nuscenes"].features, "uint8")
    assert feature_mismatch(conform(cloud, KITTI), KITTI) is None
    wrong = _memory(pts[:, :4], ("x", "y", "z", "intensity"), None)  # scale unknown: passed as is
    assert "unit reflectance" in feature_mismatch(conform(wrong, KITTI), KITTI)
