"""Read LiDAR point files strictly: a file is read as exactly what it declares, or refused with a
message that names the file and what did not fit.

Formats and rules
-----------------

Files:

- ``.bin``: raw little-endian float32 records, one per point; the layout is given by ``format=`` or
  ``columns=``, or inferred (rules below).
- ``.npy``: an ``(N, C >= 3)`` real array (float64 is narrowed to float32), or a structured array
  with fields ``x``, ``y``, ``z`` [, ``intensity``]; the layout is given by ``format=`` or generic.
- ``.pcd``: PCL PCD v0.7, ``DATA ascii``, ``binary`` or ``binary_compressed`` (LZF).
- ``.ply``: PLY 1.0, ``ascii``, ``binary_little_endian`` or ``binary_big_endian``; the points are
  the ``vertex`` element (other elements, faces included, are parsed and skipped).

Named layouts (``format=``, see :data:`POINT_FORMATS`):

- ``xyz``: x, y, z (12-byte records).
- ``xyzi``: x, y, z, intensity of unknown scale (16-byte records).
- ``kitti``: x, y, z, intensity as unit reflectance in [0, 1] (16-byte records).
- ``nuscenes``: x, y, z, intensity 0-255, ring index (20-byte records; LIDAR_TOP ``.pcd.bin``).
- ``waymo``: x, y, z, raw Waymo intensity, elongation, no-label-zone flag (1 inside a zone, -1
  outside) (24-byte records; what OpenPCDet's Waymo preparation saves per point as ``.npy``).

Rules:

- ``.bin``: give ``format=`` or ``columns=`` (not both); either is checked against the file size.
  Without them a name ending in ``.pcd.bin`` is read as ``nuscenes`` and a file in a folder named
  ``velodyne*`` (KITTI's ``training/velodyne/000008.bin``) as ``kitti``; otherwise the record width
  is inferred from the size among 12 / 16 / 20 / 24 bytes (``xyz`` / ``xyzi`` / ``nuscenes`` /
  ``waymo``, logged at INFO). A size that fits several widths is refused with each choice and its
  point count; a size that fits none is refused with the remainders. Every 24-byte size is also a
  12-byte size, so a Waymo ``.bin`` always needs ``format=waymo``, and a KITTI scan whose point
  count is a multiple of 3 or 5 needs ``format=kitti``: tools should pass the format they know.
  ``columns=C`` reads the generic layout x, y, z [, intensity] [, feature_4, ...] with intensity
  of unknown scale.
- A size that is no whole number of records is refused, naming the trailing bytes. An empty
  ``.bin`` is an empty cloud (0 points).
- ``.pcd`` / ``.ply``: the header is checked against the data: every declared point must be there,
  and nothing may follow it. ``x``, ``y``, ``z`` are required; the intensity is the field named
  ``intensity`` (or ``i``, ``reflectance``, ``remission``, ``scalar_intensity``); other fields are
  ignored unless ``format=`` asks for them by name (e.g. ``ring``). A uint8 intensity field is on the
  ``uint8`` scale; otherwise the scale is unknown unless ``format=`` says it. No Open3D needed.
- Rows with NaN or inf are refused (``nonfinite="error"``, naming how many and the first row) or
  dropped with a counted warning (``nonfinite="drop"``).
- Values beyond the float32 range are refused.

:func:`conform` lays a cloud out as a model's :class:`~voxsparse.structures.PointConvention`
(columns by name, intensity converted between known scales, ``time_lag`` zero for a single scan);
:func:`feature_mismatch` says when an intensity column does not look like the expected scale.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxsparse.structures import INTENSITY_SCALES, PointConvention

__all__ = [
    "INTENSITY_ALIASES",
    "POINT_FILE_SUFFIXES",
    "POINT_FORMATS",
    "PointCloud",
    "PointFileError",
    "PointFormat",
    "conform",
    "feature_mismatch",
    "read_points",
]

log = logging.getLogger(__name__)

#: Suffixes :func:`read_points` reads (a nuScenes ``.pcd.bin`` is a ``.bin``).
POINT_FILE_SUFFIXES: tuple[str, ...] = (".bin", ".npy", ".pcd", ".ply")

#: Field / property names read as the intensity column of a ``.pcd``, ``.ply`` or structured
#: ``.npy`` (compared case-insensitively, first match in this order wins).
INTENSITY_ALIASES: tuple[str, ...] = ("intensity", "i", "reflectance", "remission", "scalar_intensity")

#: Features a single scan may lack: filled with zeros by :func:`conform` (one sweep, no time lag).
_SINGLE_SCAN_FEATURES: tuple[str, ...] = ("time_lag", "time")


class PointFileError(ValueError):
    """A point file that cannot be read as asked; the message names the file and what is wrong.

    Attributes:
        path: the file.
        detail: the message without the leading ``point file <path>:``.
    """

    def __init__(self, path: str | os.PathLike, detail: str):
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"point file {path}: {detail}")

    def __reduce__(self):
        return (type(self), (self.path, self.detail))


@dataclass(frozen=True)
class PointFormat:
    """A named record layout.

    Attributes:
        name: the name :func:`read_points` takes as ``format=``.
        features: column names, ``x, y, z`` (metres, sensor frame) first.
        intensity: scale of the ``intensity`` column (one of
            :data:`~voxsparse.structures.INTENSITY_SCALES`), None when unknown or absent.
        dtype: the type of every column on disk (little-endian float32).
        description: one line for messages and documentation.
    """

    name: str
    features: tuple[str, ...]
    intensity: str | None
    dtype: np.dtype = field(default=np.dtype("<f4"))
    description: str = ""

    def __post_init__(self) -> None:
        if tuple(self.features[:3]) != ("x", "y", "z"):
            raise ValueError(f"PointFormat {self.name}: features must start with x, y, z")
        if self.intensity is not None and self.intensity not in INTENSITY_SCALES:
            raise ValueError(f"PointFormat {self.name}: intensity must be one of {INTENSITY_SCALES} or None")

    @property
    def columns(self) -> int:
        """Values per point."""
        return len(self.features)

    @property
    def record_dtype(self) -> np.dtype:
        """Structured dtype of one record, one field per feature."""
        return np.dtype([(name, self.dtype) for name in self.features])

    @property
    def record_bytes(self) -> int:
        """Bytes per point on disk."""
        return self.columns * self.dtype.itemsize


#: The named layouts (module docstring).
POINT_FORMATS: dict[str, PointFormat] = {
    f.name: f
    for f in (
        PointFormat("xyz", ("x", "y", "z"), None, description="x, y, z"),
        PointFormat(
            "xyzi", ("x", "y", "z", "intensity"), None, description="x, y, z, intensity (scale unknown)"
        ),
        PointFormat(
            "kitti", ("x", "y", "z", "intensity"), "unit", description="x, y, z, reflectance in [0, 1]"
        ),
        PointFormat(
            "nuscenes",
            ("x", "y", "z", "intensity", "ring"),
            "uint8",
            description="x, y, z, intensity 0-255, ring index",
        ),
        PointFormat(
            "waymo",
            ("x", "y", "z", "intensity", "elongation", "nlz_flag"),
            "waymo",
            description="x, y, z, raw intensity, elongation, no-label-zone flag (1 inside, -1 outside)",
        ),
    )
}

# .bin record widths tried when no layout is given: (format read, label in messages)
_BIN_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("xyz", "xyz"),
    ("xyzi", "kitti|xyzi"),
    ("nuscenes", "nuscenes"),
    ("waymo", "waymo"),
)


@dataclass
class PointCloud:
    """The points of one file.

    Attributes:
        points: (N, C) float32, C-contiguous (a strided array is copied); columns named by ``features``;
            x, y, z in metres.
        features: column names, ``x, y, z`` first.
        intensity: scale of the ``intensity`` column (one of
            :data:`~voxsparse.structures.INTENSITY_SCALES`), None when unknown or there is none.
        path: the file read (None for a cloud built in memory).
    """

    points: np.ndarray
    features: tuple[str, ...]
    intensity: str | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        self.features = tuple(str(f) for f in self.features)
        if self.path is not None:
            self.path = Path(self.path)
        p = self.points
        if not isinstance(p, np.ndarray) or p.dtype != np.float32 or p.ndim != 2:
            raise ValueError(f"PointCloud.points: expected an (N, C) float32 array, got {_describe(p)}")
        if not p.flags.c_contiguous:
            self.points = p = np.ascontiguousarray(p)
        if p.shape[1] != len(self.features):
            raise ValueError(
                f"PointCloud.features: {len(self.features)} names {list(self.features)} for {p.shape[1]} columns"
            )
        if self.features[:3] != ("x", "y", "z"):
            raise ValueError(f"PointCloud.features: must start with x, y, z, got {list(self.features)}")
        if self.intensity is not None and self.intensity not in INTENSITY_SCALES:
            raise ValueError(
                f"PointCloud.intensity: expected one of {INTENSITY_SCALES} or None, got {self.intensity!r}"
            )

    def __len__(self) -> int:
        return len(self.points)

    def __repr__(self) -> str:
        return (
            f"PointCloud({len(self.points):,} points, features={self.features}, intensity={self.intensity!r}, "
            f"path={str(self.path) if self.path is not None else None!r})"
        )


# --------------------------------------------------------------------------------------------
# entry point


def read_points(
    path: str | os.PathLike,
    format: str | None = None,
    columns: int | None = None,
    nonfinite: str = "error",
) -> PointCloud:
    """Read a ``.bin``, ``.npy``, ``.pcd`` or ``.ply`` point file (module docstring for the rules).

    Args:
        path: the file.
        format: a layout of :data:`POINT_FORMATS` (``xyz``, ``xyzi``, ``kitti``, ``nuscenes``,
            ``waymo``): the columns a ``.bin`` / ``.npy`` must hold, or the fields taken from a
            ``.pcd`` / ``.ply``; it also sets the intensity scale.
        columns: float32 values per point of a ``.bin`` (or columns of a ``.npy``), >= 3, read as
            x, y, z [, intensity] [, feature_4, ...] with intensity of unknown scale. Not with ``format``.
        nonfinite: ``"error"``: refuse rows with NaN/inf; ``"drop"``: drop them with a warning.

    Returns:
        The cloud: (N, C) float32 points (N may be 0), their feature names and intensity scale.

    Raises:
        PointFileError: naming the file and the field or size that does not fit.
    """
    path_str = str(path)
    path = Path(path)
    if nonfinite not in ("error", "drop"):
        raise PointFileError(path_str, f"nonfinite must be 'error' or 'drop', got {nonfinite!r}")
    fmt = None
    if format is not None:
        if format not in POINT_FORMATS:
            raise PointFileError(
                path_str, f"unknown format={format!r}; expected one of {sorted(POINT_FORMATS)}"
            )
        fmt = POINT_FORMATS[format]
    if columns is not None:
        if fmt is not None:
            raise PointFileError(
                path_str, f"give format= or columns=, not both (format={format}, columns={columns})"
            )
        if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 3:
            raise PointFileError(
                path_str, f"columns must be an integer >= 3 (x, y, z first), got {columns!r}"
            )
        columns = int(columns)

    suffix = path.suffix.lower()
    if not os.path.lexists(path):
        raise PointFileError(path_str, "no such file")
    if path.is_dir():
        raise PointFileError(path_str, "is a directory, not a point file")
    if not path.is_file():
        raise PointFileError(path_str, "is not a regular file (a broken link or a device?)")
    if suffix not in POINT_FILE_SUFFIXES:
        raise PointFileError(
            path_str, f"unknown suffix {suffix!r}; expected one of {', '.join(POINT_FILE_SUFFIXES)}"
        )
    if columns is not None and suffix not in (".bin", ".npy"):
        raise PointFileError(path_str, f"columns= applies to .bin and .npy files, not {suffix} (use format=)")
    try:
        if suffix == ".npy":
            return _finish(path_str, *_read_npy(path_str, path, fmt, columns), nonfinite)
        data = path.read_bytes()
    except OSError as exc:
        raise PointFileError(path_str, f"cannot be read: {exc.strerror or exc}") from exc
    if suffix == ".bin":
        result = _read_bin(path_str, data, fmt, columns)
    elif suffix == ".pcd":
        result = _select_fields(path_str, _read_pcd(path_str, data), fmt, "field")
    else:
        result = _select_fields(path_str, _read_ply(path_str, data), fmt, "vertex property")
    return _finish(path_str, *result, nonfinite)


def _finish(
    path: str, points: np.ndarray, features: tuple[str, ...], intensity: str | None, nonfinite: str
) -> PointCloud:
    points = np.array(points, dtype=np.float32, order="C", copy=True)
    if points.size:
        finite = np.isfinite(points).all(axis=1)
        bad = len(points) - int(finite.sum())
        if bad:
            if nonfinite == "error":
                first = int(np.flatnonzero(~finite)[0])
                raise PointFileError(
                    path,
                    f"{bad:,} of {len(points):,} rows hold NaN/inf (first at row {first:,}); "
                    "pass nonfinite='drop' to drop them",
                )
            message = f"point file {path}: dropped {bad:,} of {len(points):,} rows with NaN/inf"
            log.warning(message)
            warnings.warn(message, stacklevel=3)
            points = np.ascontiguousarray(points[finite])
    return PointCloud(points, features, intensity, Path(path))


# --------------------------------------------------------------------------------------------
# shared helpers


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def _generic_features(n: int) -> tuple[str, ...]:
    names = ["x", "y", "z"]
    if n >= 4:
        names.append("intensity")
    names += [f"feature_{i}" for i in range(4, n)]
    return tuple(names)


def _to_float32(path: str, what: str, values: np.ndarray) -> np.ndarray:
    """``values`` as float32; refuses non-real types and finite values beyond the float32 range."""
    kind = values.dtype.kind
    if kind not in "fiu":
        raise PointFileError(path, f"{what}: expected real numbers, got dtype {values.dtype}")
    if values.dtype == np.float32:
        return values
    if kind == "f" and values.dtype.itemsize > 4:
        with np.errstate(over="ignore", invalid="ignore"):
            out = values.astype(np.float32)
        overflow = np.isfinite(values) & ~np.isfinite(out)
        if overflow.any():
            rows = np.flatnonzero(overflow.reshape(len(values), -1).any(axis=1))
            worst = float(np.abs(values[overflow]).max())
            raise PointFileError(
                path,
                f"{what}: {int(overflow.sum()):,} values beyond the float32 range (largest magnitude {worst:.4g}; "
                f"first at row {int(rows[0]):,})",
            )
        return out
    return values.astype(np.float32)


def _layout(path: str, ncols: int, fmt: PointFormat | None, columns: int | None, what: str):
    """(features, intensity scale) of an (N, ncols) matrix read as ``fmt`` / ``columns`` / generic."""
    if fmt is not None:
        if ncols != fmt.columns:
            raise PointFileError(
                path,
                f"{what} has {ncols} columns but format={fmt.name} has {fmt.columns} ({', '.join(fmt.features)})",
            )
        return fmt.features, fmt.intensity
    if columns is not None and ncols != columns:
        raise PointFileError(path, f"{what} has {ncols} columns, not columns={columns}")
    return _generic_features(ncols), None


# --------------------------------------------------------------------------------------------
# .bin


def _read_bin(path: str, data: bytes, fmt: PointFormat | None, columns: int | None):
    size = len(data)
    if fmt is not None:
        ncols, chosen, how = fmt.columns, fmt, None
    elif columns is not None:
        ncols, chosen, how = columns, None, None
    elif path.lower().endswith(".pcd.bin"):
        ncols, chosen, how = 5, POINT_FORMATS["nuscenes"], "the name ends in .pcd.bin (nuScenes LIDAR_TOP)"
    elif Path(path).parent.name.lower().startswith("velodyne"):
        ncols, chosen, how = 4, POINT_FORMATS["kitti"], "it lies in a velodyne* folder (KITTI's layout)"
    elif size == 0:
        log.info("point file %s: empty, read as 0 points of format=xyz", path)
        return np.zeros((0, 3), np.float32), POINT_FORMATS["xyz"].features, None
    else:
        fits = [
            (POINT_FORMATS[name], label)
            for name, label in _BIN_CANDIDATES
            if size % POINT_FORMATS[name].record_bytes == 0
        ]
        if len(fits) > 1:
            choices = [
                f"format={label} ({f.columns} float32 columns, {size // f.record_bytes:,} points)"
                for f, label in fits
            ]
            choices = ", ".join(choices[:-1]) + " and " + choices[-1]
            raise PointFileError(path, f"{size:,} bytes fit {choices}; pass format=<name> or columns=<N>")
        if not fits:
            remainders = ", ".join(
                f"{size % POINT_FORMATS[name].record_bytes} after {POINT_FORMATS[name].record_bytes}-byte records"
                for name, _ in _BIN_CANDIDATES
            )
            raise PointFileError(
                path,
                f"{size:,} bytes is no whole number of 12/16/20/24-byte float32 records (bytes left over: "
                f"{remainders}); truncated or not raw float32 points?",
            )
        chosen = fits[0][0]
        ncols = chosen.columns
        how = f"only {chosen.record_bytes}-byte records divide its {size:,} bytes"
        if chosen.intensity is None and "intensity" in chosen.features:
            how += "; intensity scale unknown, pass format=kitti for reflectance in [0, 1]"
    record = 4 * ncols
    trailing = size % record
    if trailing:
        named = f"format={chosen.name}, " if chosen is not None else ""
        raise PointFileError(
            path,
            f"{size:,} bytes is {size // record:,} records of {record} bytes ({named}{ncols} float32 columns) plus "
            f"{trailing} trailing bytes; truncated, or another record width?",
        )
    points = np.frombuffer(data, dtype="<f4").reshape(-1, ncols)
    if chosen is not None:
        features, intensity = chosen.features, chosen.intensity
    else:
        features, intensity = _generic_features(ncols), None
    if how is not None:
        log.info(
            "point file %s: read as format=%s (%s; %s points): %s",
            path,
            chosen.name,
            chosen.description,
            f"{len(points):,}",
            how,
        )
    return points, features, intensity


# --------------------------------------------------------------------------------------------
# .npy


def _read_npy(path: str, file: Path, fmt: PointFormat | None, columns: int | None):
    with open(file, "rb") as handle:
        magic = handle.read(6)
    if not magic:
        raise PointFileError(path, "empty file (a .npy holds at least a header)")
    if magic != b"\x93NUMPY":
        raise PointFileError(path, "not a .npy file (it does not start with the NumPy magic bytes)")
    try:
        array = np.load(file, allow_pickle=False)
    except ValueError as exc:  # object arrays, or not a .npy at all
        raise PointFileError(path, f"not a readable numeric .npy array ({exc})") from exc
    except EOFError as exc:
        raise PointFileError(path, "empty or truncated .npy file") from exc
    if not isinstance(array, np.ndarray):
        raise PointFileError(path, f"expected one array, got {type(array).__name__}")
    if array.dtype.names is not None:
        if columns is not None:
            raise PointFileError(path, "columns= does not apply to a structured array (fields are named)")
        flat = array.reshape(-1)
        fields = [(name, flat[name]) for name in array.dtype.names]
        return _select_fields(path, fields, fmt, "field")
    if array.ndim != 2 or array.shape[1] < 3:
        raise PointFileError(
            path, f"expected an (N, C >= 3) array of x, y, z [, features], got shape {array.shape}"
        )
    if array.dtype.kind not in "fiu":
        raise PointFileError(path, f"expected real numbers, got dtype {array.dtype}")
    features, intensity = _layout(path, array.shape[1], fmt, columns, f"the array of shape {array.shape}")
    return _to_float32(path, "the array", array), features, intensity


# --------------------------------------------------------------------------------------------
# named fields (.pcd, .ply, structured .npy)


def _find(fields: Sequence[tuple[str, np.ndarray]], names: Sequence[str]) -> int | None:
    """Index of the first field matching ``names`` (exact, then case-insensitive, in name order)."""
    for name in names:
        for i, (f, _) in enumerate(fields):
            if f == name:
                return i
        for i, (f, _) in enumerate(fields):
            if f.lower() == name.lower():
                return i
    return None


def _select_fields(path: str, fields: Sequence[tuple[str, np.ndarray]], fmt: PointFormat | None, kind: str):
    """(points, features, intensity scale) from named per-point fields (each (N,) or (N, count))."""
    have = ", ".join(name for name, _ in fields) or "none"
    wanted = fmt.features if fmt is not None else ("x", "y", "z", "intensity")
    picked: list[tuple[str, int]] = []
    for feature in wanted:
        i = _find(fields, INTENSITY_ALIASES if feature == "intensity" else (feature,))
        if i is None:
            if fmt is None and feature == "intensity":
                continue
            need = f"format={fmt.name} needs" if fmt is not None else "a point needs"
            raise PointFileError(path, f"{need} a {kind} named {feature!r}; the file has {have}")
        picked.append((feature, i))
    columns = []
    for feature, i in picked:
        name, values = fields[i]
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise PointFileError(
                path, f"{kind} {name!r} holds {values.shape[1]} values per point; expected 1"
            )
        columns.append(_to_float32(path, f"{kind} {name!r}", values))
    n = len(fields[picked[0][1]][1])
    points = np.stack(columns, axis=1) if n else np.zeros((0, len(columns)), np.float32)
    features = tuple(feature for feature, _ in picked)
    if fmt is not None:
        intensity = fmt.intensity
    elif "intensity" in features:
        source = fields[dict(picked)["intensity"]][1]
        intensity = "uint8" if source.dtype == np.uint8 else None
    else:
        intensity = None
    return points, features, intensity


# --------------------------------------------------------------------------------------------
# .pcd (PCL PCD v0.7)

_PCD_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")
_PCD_TYPES = {
    ("I", 1): "i1",
    ("I", 2): "<i2",
    ("I", 4): "<i4",
    ("I", 8): "<i8",
    ("U", 1): "u1",
    ("U", 2): "<u2",
    ("U", 4): "<u4",
    ("U", 8): "<u8",
    ("F", 4): "<f4",
    ("F", 8): "<f8",
}


def _header_lines(path: str, data: bytes, what: str, limit: int = 1 << 20):
    """Yield (line number, text, offset after the line) for the header lines of ``data``."""
    pos, number = 0, 0
    while pos < len(data) and pos < limit:
        end = data.find(b"\n", pos)
        stop = len(data) if end < 0 else end + 1
        raw = data[pos:stop]
        number += 1
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise PointFileError(path, f"{what} header line {number} is not ASCII text") from None
        yield number, text, stop
        pos = stop


def _pcd_int(path: str, key: str, value: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        raise PointFileError(path, f"PCD header {key} {value!r} is not an integer") from None
    if number < minimum:
        raise PointFileError(path, f"PCD header {key} must be >= {minimum}, got {number}")
    return number


def _read_pcd(path: str, data: bytes) -> list[tuple[str, np.ndarray]]:
    header: dict[str, list[str]] = {}
    offset = None
    for number, text, stop in _header_lines(path, data, "PCD"):
        if not text or text.startswith("#"):
            continue
        key, *values = text.split()
        key = key.upper()
        if key not in _PCD_KEYS:
            first = "" if header else " (not a PCD v0.7 file?)"
            raise PointFileError(path, f"PCD header line {number}: unknown entry {text[:40]!r}{first}")
        if key in header:
            raise PointFileError(path, f"PCD header line {number}: {key} given twice")
        if not values:
            raise PointFileError(path, f"PCD header line {number}: {key} has no value")
        header[key] = values
        if key == "DATA":
            offset = stop
            break
    if offset is None:
        raise PointFileError(path, "PCD header has no DATA line (not a PCD file, or cut short?)")
    for key in ("FIELDS", "SIZE", "TYPE", "WIDTH", "HEIGHT"):
        if key not in header:
            raise PointFileError(path, f"PCD header has no {key} line")
    names = header["FIELDS"]
    sizes = [_pcd_int(path, "SIZE", v, 1) for v in header["SIZE"]]
    types = [t.upper() for t in header["TYPE"]]
    counts = [_pcd_int(path, "COUNT", v, 1) for v in header.get("COUNT", ["1"] * len(names))]
    for key, values in (("SIZE", sizes), ("TYPE", types), ("COUNT", counts)):
        if len(values) != len(names):
            raise PointFileError(
                path,
                f"PCD header {key} has {len(values)} entries for {len(names)} FIELDS ({' '.join(names)})",
            )
    width = _pcd_int(path, "WIDTH", header["WIDTH"][0])
    height = _pcd_int(path, "HEIGHT", header["HEIGHT"][0])
    points = _pcd_int(path, "POINTS", header["POINTS"][0]) if "POINTS" in header else width * height
    if width * height != points:
        raise PointFileError(
            path, f"PCD header WIDTH {width} x HEIGHT {height} = {width * height:,} != POINTS {points:,}"
        )
    if "VIEWPOINT" in header and len(header["VIEWPOINT"]) != 7:
        raise PointFileError(path, f"PCD header VIEWPOINT has {len(header['VIEWPOINT'])} numbers, expected 7")
    formats = []
    for name, size, kind, count in zip(names, sizes, types, counts):
        code = _PCD_TYPES.get((kind, size))
        if code is None:
            raise PointFileError(
                path, f"PCD field {name!r}: TYPE {kind} SIZE {size} is not one of I/U 1,2,4,8 or F 4,8"
            )
        formats.append((np.dtype(code), count))
    mode = header["DATA"][0].lower()
    body = data[offset:]
    if mode == "ascii":
        return _pcd_ascii(path, body, names, formats, points)
    record = np.dtype([(f"f{i}", code, (count,)) for i, (code, count) in enumerate(formats)])
    if mode == "binary":
        need = points * record.itemsize
        if len(body) < need:
            raise PointFileError(
                path,
                f"PCD header declares {points:,} points ({need:,} bytes of {record.itemsize}-byte records) but the "
                f"binary data holds {len(body):,} bytes ({len(body) // record.itemsize:,} points)",
            )
        if len(body) > need:
            raise PointFileError(
                path, f"{len(body) - need:,} bytes follow the {points:,} points the PCD header declares"
            )
        table = np.frombuffer(body, dtype=record, count=points)
        return [(name, table[f"f{i}"].reshape(points, formats[i][1])) for i, name in enumerate(names)]
    if mode == "binary_compressed":
        return _pcd_compressed(path, body, names, formats, points, record.itemsize)
    raise PointFileError(path, f"PCD DATA {header['DATA'][0]!r}: expected ascii, binary or binary_compressed")


def _check_row_widths(path: str, rows: list[list[str]], width: int, row_name: str, declared: str) -> None:
    """Refuse ascii rows that do not hold ``width`` values, naming the first and how many differ."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    wrong = np.flatnonzero(lengths != width)
    if len(wrong):
        r = int(wrong[0])
        raise PointFileError(
            path, f"{row_name} {r:,} has {lengths[r]} values but {declared} {width} ({len(wrong):,} rows differ)"
        )


def _pcd_ascii(path: str, body: bytes, names, formats, points: int) -> list[tuple[str, np.ndarray]]:
    try:
        lines = body.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise PointFileError(path, "PCD ascii data is not ASCII text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != points:
        raise PointFileError(
            path, f"PCD header declares {points:,} points but the ascii data holds {len(lines):,} rows"
        )
    width = sum(count for _, count in formats)
    rows = [line.split() for line in lines]
    _check_row_widths(path, rows, width, "PCD ascii row", "FIELDS/COUNT declare")
    flat = [token for row in rows for token in row]
    try:
        values = np.array(flat, dtype=np.float64).reshape(points, width)
    except ValueError:
        for r, row in enumerate(rows):
            for token in row:
                try:
                    float(token)
                except ValueError:
                    raise PointFileError(path, f"PCD ascii row {r:,}: {token!r} is not a number") from None
        raise
    out, start = [], 0
    for name, (code, count) in zip(names, formats):
        out.append((name, _ascii_cast(path, f"PCD field {name!r}", values[:, start : start + count], code)))
        start += count
    return out


def _pcd_compressed(path: str, body: bytes, names, formats, points: int, itemsize: int):
    if len(body) < 8:
        if points == 0 and not body:
            return [(name, np.zeros((0, count), code)) for name, (code, count) in zip(names, formats)]
        raise PointFileError(
            path, f"PCD binary_compressed data is {len(body)} bytes, too short for its size words"
        )
    compressed, raw = struct.unpack_from("<II", body)
    if raw != points * itemsize:
        raise PointFileError(
            path,
            f"PCD binary_compressed data unpacks to {raw:,} bytes but the header declares {points:,} points "
            f"of {itemsize} bytes ({points * itemsize:,} bytes)",
        )
    if len(body) - 8 < compressed:
        raise PointFileError(
            path,
            f"PCD binary_compressed data declares {compressed:,} compressed bytes but {len(body) - 8:,} follow",
        )
    if len(body) - 8 > compressed:
        raise PointFileError(
            path,
            f"{len(body) - 8 - compressed:,} bytes follow the {compressed:,} compressed bytes of PCD data",
        )
    try:
        plain = _lzf_decompress(body[8 : 8 + compressed], raw)
    except ValueError as exc:
        raise PointFileError(path, f"PCD binary_compressed data is corrupt: {exc}") from None
    out, start = [], 0
    for name, (code, count) in zip(names, formats):  # one block per field, all points of it in a row
        block = points * count * code.itemsize
        out.append(
            (
                name,
                np.frombuffer(plain, dtype=code, count=points * count, offset=start).reshape(points, count),
            )
        )
        start += block
    return out


def _lzf_decompress(src: bytes, size: int) -> bytes:
    """LZF (liblzf) decompression of ``src`` into exactly ``size`` bytes.

    The stream is a run of tokens: a control byte ``c < 32`` is followed by ``c + 1`` literal bytes;
    otherwise ``c >> 5`` (7: plus the next byte) + 2 bytes are copied from ``((c & 31) << 8) +
    next byte + 1`` bytes back in the output (the copy may overlap what it writes).
    """
    out = bytearray(size)
    ip = op = 0
    n = len(src)
    while ip < n:
        ctrl = src[ip]
        ip += 1
        if ctrl < 32:
            length = ctrl + 1
            if ip + length > n:
                raise ValueError(f"a literal run of {length} bytes at input byte {ip - 1:,} passes the end")
            if op + length > size:
                raise ValueError(f"output passes the declared {size:,} bytes")
            out[op : op + length] = src[ip : ip + length]
            ip += length
            op += length
            continue
        length = ctrl >> 5
        if length == 7:
            if ip >= n:
                raise ValueError("input ends inside a back reference")
            length += src[ip]
            ip += 1
        if ip >= n:
            raise ValueError("input ends inside a back reference")
        ref = op - ((ctrl & 0x1F) << 8) - src[ip] - 1
        ip += 1
        length += 2
        if ref < 0:
            raise ValueError(f"a back reference at output byte {op:,} points before the start")
        if op + length > size:
            raise ValueError(f"output passes the declared {size:,} bytes")
        if ref + length <= op:
            out[op : op + length] = out[ref : ref + length]
        else:  # overlapping copy: the last op - ref bytes repeat
            period = out[ref:op]
            out[op : op + length] = (period * (length // len(period) + 1))[:length]
        op += length
    if op != size:
        raise ValueError(f"unpacks to {op:,} bytes, not the declared {size:,}")
    return bytes(out)


# --------------------------------------------------------------------------------------------
# .ply (PLY 1.0)

_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}
_PLY_ENCODINGS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


@dataclass
class _PlyProperty:
    name: str
    dtype: np.dtype  # the value type (of the items, for a list)
    count_dtype: np.dtype | None = None  # the length type of a list property


@dataclass
class _PlyElement:
    name: str
    count: int
    properties: list[_PlyProperty] = field(default_factory=list)

    @property
    def has_lists(self) -> bool:
        return any(p.count_dtype is not None for p in self.properties)


def _ply_type(path: str, number: int, name: str, endian: str) -> np.dtype:
    code = _PLY_TYPES.get(name)
    if code is None:
        raise PointFileError(path, f"PLY header line {number}: unknown property type {name!r}")
    return np.dtype(code).newbyteorder(endian)


def _read_ply(path: str, data: bytes) -> list[tuple[str, np.ndarray]]:
    if not data.startswith((b"ply\n", b"ply\r\n")):
        raise PointFileError(path, "does not start with the PLY magic line 'ply'")
    encoding, endian, offset = None, "<", None
    elements: list[_PlyElement] = []
    for number, text, stop in _header_lines(path, data, "PLY"):
        if number == 1:
            continue
        words = text.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        key = words[0]
        if key == "end_header":
            offset = stop
            break
        if key == "format":
            if encoding is not None or elements:
                raise PointFileError(path, f"PLY header line {number}: a second or late format line")
            if len(words) != 3 or words[1] not in _PLY_ENCODINGS or words[2] != "1.0":
                raise PointFileError(
                    path,
                    f"PLY header line {number}: {text!r}; expected 'format ascii|binary_little_endian|"
                    "binary_big_endian 1.0'",
                )
            encoding = words[1]
            endian = _PLY_ENCODINGS[encoding] or "<"
        elif key == "element":
            if encoding is None:
                raise PointFileError(path, f"PLY header line {number}: element before the format line")
            if len(words) != 3:
                raise PointFileError(
                    path, f"PLY header line {number}: {text!r}; expected 'element <name> <count>'"
                )
            try:
                count = int(words[2])
            except ValueError:
                count = -1
            if count < 0:
                raise PointFileError(
                    path, f"PLY header line {number}: element count {words[2]!r} is not a count"
                )
            if any(e.name == words[1] for e in elements):
                raise PointFileError(path, f"PLY header line {number}: element {words[1]!r} declared twice")
            elements.append(_PlyElement(words[1], count))
        elif key == "property":
            if not elements:
                raise PointFileError(path, f"PLY header line {number}: property before any element")
            if len(words) == 5 and words[1] == "list":
                prop = _PlyProperty(
                    words[4],
                    _ply_type(path, number, words[3], endian),
                    _ply_type(path, number, words[2], endian),
                )
                if prop.count_dtype.kind not in "iu":
                    raise PointFileError(
                        path, f"PLY header line {number}: list length type must be an integer"
                    )
            elif len(words) == 3:
                prop = _PlyProperty(words[2], _ply_type(path, number, words[1], endian))
            else:
                raise PointFileError(
                    path,
                    f"PLY header line {number}: {text!r}; expected 'property <type> <name>' or "
                    "'property list <count type> <type> <name>'",
                )
            if any(p.name == prop.name for p in elements[-1].properties):
                raise PointFileError(path, f"PLY header line {number}: property {prop.name!r} declared twice")
            elements[-1].properties.append(prop)
        else:
            raise PointFileError(path, f"PLY header line {number}: unknown entry {text[:40]!r}")
    if offset is None:
        raise PointFileError(path, "PLY header has no end_header line (cut short?)")
    if encoding is None:
        raise PointFileError(path, "PLY header has no format line")
    vertex = next((e for e in elements if e.name == "vertex"), None)
    if vertex is None:
        raise PointFileError(path, f"PLY file has no vertex element (elements: {[e.name for e in elements]})")
    body = memoryview(data)[offset:]
    if encoding == "ascii":
        return _ply_ascii(path, bytes(body), elements, vertex)
    pos, result = 0, []
    for element in elements:
        fields, pos = _ply_binary_element(path, body, pos, element, element is vertex)
        if element is vertex:
            result = fields
    if pos != len(body):
        raise PointFileError(
            path,
            f"{len(body) - pos:,} bytes follow the declared PLY elements "
            f"({', '.join(f'{e.count:,} {e.name}' for e in elements)})",
        )
    return result


def _ply_binary_element(path: str, body: memoryview, pos: int, element: _PlyElement, want: bool):
    """(fields of ``element`` if ``want``, position after it) in binary PLY data starting at ``pos``."""
    available = len(body) - pos
    if not element.has_lists:
        record = np.dtype([(f"p{i}", p.dtype) for i, p in enumerate(element.properties)])
        need = element.count * record.itemsize
        if available < need:
            raise PointFileError(
                path,
                f"PLY element {element.name!r} declares {element.count:,} records ({need:,} bytes of "
                f"{record.itemsize}) but {available:,} bytes remain ({available // max(record.itemsize, 1):,} records)",
            )
        fields = []
        if want and record.itemsize:
            table = np.frombuffer(body, dtype=record, count=element.count, offset=pos)
            fields = [(p.name, table[f"p{i}"]) for i, p in enumerate(element.properties)]
        return fields, pos + need
    if element.count == 0:
        return [(p.name, np.zeros(0, p.dtype)) for p in element.properties if p.count_dtype is None], pos
    # try every record having the first record's list lengths (triangle meshes), else walk record by record
    lengths, q = [], pos
    try:
        for p in element.properties:
            if p.count_dtype is None:
                q += p.dtype.itemsize
            else:
                k = int(np.frombuffer(body, p.count_dtype, 1, q)[0])
                lengths.append(k)
                q += p.count_dtype.itemsize + k * p.dtype.itemsize
    except ValueError:
        lengths = None
    if lengths is not None and min(lengths) >= 0:
        parts, it = [], iter(lengths)
        for i, p in enumerate(element.properties):
            if p.count_dtype is None:
                parts.append((f"p{i}", p.dtype))
            else:
                parts += [(f"n{i}", p.count_dtype), (f"v{i}", p.dtype, (next(it),))]
        record = np.dtype(parts)
        if element.count * record.itemsize <= available:
            table = np.frombuffer(body, dtype=record, count=element.count, offset=pos)
            it = iter(lengths)
            if all(
                (table[f"n{i}"] == next(it)).all() for i, p in enumerate(element.properties) if p.count_dtype
            ):
                fields = [
                    (p.name, table[f"p{i}"])
                    for i, p in enumerate(element.properties)
                    if p.count_dtype is None
                ]
                return (fields if want else []), pos + element.count * record.itemsize
    return _ply_binary_walk(path, body, pos, element, want)


def _ply_binary_walk(path: str, body: memoryview, pos: int, element: _PlyElement, want: bool):
    scalars = [(i, p) for i, p in enumerate(element.properties) if p.count_dtype is None]
    offsets = {i: np.empty(element.count, np.int64) for i, _ in scalars} if want else {}
    end = len(body)
    for r in range(element.count):
        for i, p in enumerate(element.properties):
            if p.count_dtype is None:
                if want:
                    offsets[i][r] = pos
                pos += p.dtype.itemsize
            else:
                if pos + p.count_dtype.itemsize > end:
                    pos = end + 1
                    break
                (k,) = struct.unpack_from(_struct_code(p.count_dtype), body, pos)
                if k < 0:
                    raise PointFileError(path, f"PLY element {element.name!r} record {r:,}: list length {k}")
                pos += p.count_dtype.itemsize + k * p.dtype.itemsize
        if pos > end:
            raise PointFileError(
                path,
                f"PLY element {element.name!r} declares {element.count:,} records but the data ends in "
                f"record {r:,} ({r:,} whole records found)",
            )
    fields = []
    raw = np.frombuffer(body, np.uint8)
    for i, p in scalars:
        gather = raw[offsets[i][:, None] + np.arange(p.dtype.itemsize)] if want else None
        if want:
            fields.append((p.name, np.ascontiguousarray(gather).view(p.dtype).reshape(-1)))
    return fields, pos


def _struct_code(dtype: np.dtype) -> str:
    order = ">" if dtype.byteorder == ">" else "<"
    return (
        order
        + {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I"}[dtype.kind + str(dtype.itemsize)]
    )


def _ply_ascii(path: str, body: bytes, elements: list[_PlyElement], vertex: _PlyElement):
    try:
        lines = body.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise PointFileError(path, "PLY ascii data is not ASCII text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    at, result = 0, []
    for element in elements:
        rows = [line.split() for line in lines[at : at + element.count]]
        if len(rows) < element.count:
            raise PointFileError(
                path,
                f"PLY element {element.name!r} declares {element.count:,} rows but the data holds {len(rows):,}",
            )
        if not element.has_lists:
            width = len(element.properties)
            _check_row_widths(path, rows, width, f"PLY element {element.name!r} row", "its properties declare")
            if element is vertex:
                values = _ascii_numbers(path, element.name, rows).reshape(len(rows), width)
                result = [
                    (p.name, _ascii_cast(path, f"PLY property {p.name!r}", values[:, i], p.dtype))
                    for i, p in enumerate(element.properties)
                ]
        else:
            picked = _ply_ascii_uniform(rows, element)
        if element.has_lists and picked is None:
            picked = {
                i: np.empty(element.count) for i, p in enumerate(element.properties) if p.count_dtype is None
            }
            for r, row in enumerate(rows):
                k = 0
                for i, p in enumerate(element.properties):
                    if p.count_dtype is None:
                        if element is vertex and k < len(row):
                            picked[i][r] = _ascii_number(path, element.name, r, row[k])
                        k += 1
                    else:
                        n = _ascii_number(path, element.name, r, row[k]) if k < len(row) else 0
                        if not n.is_integer() or n < 0:
                            raise PointFileError(
                                path, f"PLY element {element.name!r} row {r:,}: list length {row[k]!r}"
                            )
                        k += 1 + int(n)
                if k != len(row):
                    raise PointFileError(
                        path,
                        f"PLY element {element.name!r} row {r:,} has {len(row)} values but its properties and "
                        f"list lengths declare {k}",
                    )
        if element.has_lists and element is vertex:
            props = element.properties
            result = [
                (props[i].name, _ascii_cast(path, f"PLY property {props[i].name!r}", v, props[i].dtype))
                for i, v in picked.items()
            ]
        at += element.count
    if at < len(lines):
        raise PointFileError(
            path,
            f"{len(lines) - at:,} rows follow the declared PLY elements "
            f"({', '.join(f'{e.count:,} {e.name}' for e in elements)})",
        )
    return result


def _ply_ascii_uniform(rows: list[list[str]], element: _PlyElement) -> dict[int, np.ndarray] | None:
    """Scalar property columns of an ascii element whose rows all have the first row's list lengths
    (a triangle mesh), checked at once; None when they do not (then each row is checked)."""
    if not rows:
        return {i: np.empty(0) for i, p in enumerate(element.properties) if p.count_dtype is None}
    first, k, spans = rows[0], 0, []  # (column, list length or None) per property
    try:
        for p in element.properties:
            if p.count_dtype is None:
                spans.append((k, None))
                k += 1
            else:
                n = int(first[k])
                if n < 0:
                    return None
                spans.append((k, n))
                k += 1 + n
    except (IndexError, ValueError):
        return None
    if any(len(row) != k for row in rows):
        return None
    try:
        table = np.array([t for row in rows for t in row], dtype=np.float64).reshape(len(rows), k)
    except ValueError:
        return None
    if any(n is not None and (table[:, c] != n).any() for c, n in spans):
        return None
    return {i: table[:, c] for i, (c, n) in enumerate(spans) if n is None}


def _ascii_cast(path: str, what: str, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Parsed ascii numbers (float64) as the declared type; integers must be whole and in range."""
    if dtype.kind not in "iu":
        return values
    info = np.iinfo(dtype)
    wrong = (values != np.round(values)) | (values < info.min) | (values > info.max)
    if wrong.any():
        r = int(np.flatnonzero(wrong.reshape(len(values), -1).any(axis=1))[0])
        bad = values.reshape(len(values), -1)[r]
        raise PointFileError(path, f"{what} row {r:,}: {bad.tolist()} is no {dtype.name} value")
    return values.astype(dtype.newbyteorder("="))


def _ascii_number(path: str, element: str, row: int, token: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise PointFileError(
            path, f"PLY element {element!r} row {row:,}: {token!r} is not a number"
        ) from None


def _ascii_numbers(path: str, element: str, rows: list[list[str]]) -> np.ndarray:
    try:
        return np.array([t for row in rows for t in row], dtype=np.float64)
    except ValueError:
        for r, row in enumerate(rows):
            for token in row:
                _ascii_number(path, element, r, token)
        raise


# --------------------------------------------------------------------------------------------
# model conventions

_SCALE_WORDS = {
    "unit": "unit reflectance in [0, 1]",
    "uint8": "0-255 intensity (uint8 scale)",
    "waymo": "raw Waymo intensity (>= 0, fed through tanh)",
}
_WAYMO_TOP = np.nextafter(np.float32(1.0), np.float32(0.0))  # largest float32 below 1


def _convert_intensity(values: np.ndarray, source: str, target: str) -> np.ndarray:
    """``values`` from scale ``source`` to ``target`` (both of INTENSITY_SCALES)."""
    if source == target:
        return values
    unit = {"unit": values, "uint8": values / np.float32(255.0), "waymo": np.tanh(values)}[source]
    if target == "unit":
        return unit
    if target == "uint8":
        return unit * np.float32(255.0)
    return np.arctanh(np.clip(unit, 0.0, _WAYMO_TOP))  # waymo: tanh of the result is the unit value


def conform(cloud: PointCloud, convention: PointConvention) -> np.ndarray:
    """The cloud's points as a model expects them: (N, len(convention.features)) float32.

    - Columns are picked by name, in the convention's order.
    - ``intensity`` is converted when both scales are known: ``uint8`` <-> ``unit`` by 255,
      ``waymo`` -> ``unit`` by tanh (what OpenPCDet feeds its Waymo models), ``unit`` -> ``waymo``
      by atanh of the value clipped to [0, 1) (so tanh of the result gives back the unit value;
      1.0 maps to about 8.7), ``uint8`` <-> ``waymo`` through ``unit``. A cloud whose scale is
      unknown (``xyzi``, ``columns=``, a plain ``.npy``) passes as it is; :func:`feature_mismatch`
      tells when it does not look right.
    - ``time_lag`` / ``time`` missing from a single scan are zeros (one sweep, no lag).
    - An empty cloud gives (0, C) whatever it lacks.

    Raises:
        PointFileError: a feature the model needs that the file does not have, naming both.
    """
    where = cloud.path if cloud.path is not None else "<in memory>"
    index = {name: i for i, name in enumerate(cloud.features)}
    out = np.zeros((len(cloud.points), len(convention.features)), np.float32)
    for j, feature in enumerate(convention.features):
        i = index.get(feature)
        if i is None:
            if feature in _SINGLE_SCAN_FEATURES or len(cloud.points) == 0:
                continue
            hint = [f.name for f in POINT_FORMATS.values() if feature in f.features]
            raise PointFileError(
                where,
                f"the model expects feature {feature!r} ({', '.join(convention.features)}) but the file has "
                f"{', '.join(cloud.features)}"
                + (f"; if the file holds it, read it with format={'|'.join(hint)}" if hint else ""),
            )
        column = cloud.points[:, i]
        if feature == "intensity" and cloud.intensity is not None:
            column = _convert_intensity(column, cloud.intensity, convention.intensity)
        out[:, j] = column
    return out


def feature_mismatch(points: np.ndarray, convention: PointConvention) -> str | None:
    """One line saying how the intensity column of ``points`` (laid out as ``convention``, e.g. by
    :func:`conform`) does not look like the convention's scale, or None when it does (or there is
    no intensity column, or no points).

    Checks: ``unit`` values within [0, 1]; ``uint8`` values within [0, 255] and not all fractions
    below 1 (a unit reflectance); ``waymo`` values >= 0 and not whole numbers above 1 (0-255 data).

    Raises:
        ValueError: ``points`` is not (N, len(convention.features)).
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != len(convention.features):
        raise ValueError(
            f"feature_mismatch: expected (N, {len(convention.features)}) points "
            f"({', '.join(convention.features)}), got shape {points.shape}"
        )
    if "intensity" not in convention.features:
        return None
    values = points[:, convention.features.index("intensity")].astype(np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high, p99 = float(values.min()), float(values.max()), float(np.percentile(values, 99))
    tol = 1e-3
    scale = convention.intensity
    if low < -tol:
        bad = True
    elif scale == "unit":
        bad = high > 1.0 + tol
    elif scale == "uint8":
        bad = high > 255.0 + tol or (high <= 1.0 and bool((values != np.round(values)).any()))
    else:  # waymo
        bad = high > 1.0 and bool((values == np.round(values)).all())
    if not bad:
        return None
    digits = 1 if max(abs(low), abs(high)) >= 2 else 3
    return (
        f"intensity spans {low:.{digits}f}-{high:.{digits}f} (99th percentile {p99:.{digits}f}) but the model "
        f"expects {_SCALE_WORDS[scale]}"
    )
