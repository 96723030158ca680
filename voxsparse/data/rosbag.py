"""ROS messages without ROS: recorded drives read and written message by message, and
``sensor_msgs/PointCloud2`` decoded to a :class:`~voxsparse.data.pointfile.PointCloud`.

Containers (:func:`open_drive`, :class:`DriveWriter`):

- ROS 1 ``.bag`` and ROS 2 bags (a folder with ``metadata.yaml``, sqlite3 or mcap storage, or a lone
  ``.db3``) through ``rosbags``; messages are decoded with the definitions the bag carries (a ROS 2 bag
  without them with rosbags' newest type store).
- Plain ``.mcap`` files of any profile through the ``mcap`` library, decoded with the ROS definitions
  in their schemas (``ros2msg`` / ``ros2idl`` with ``cdr`` messages, ``ros1msg`` with ``ros1``).

Message types are named as rosbags names them: ``sensor_msgs/msg/PointCloud2`` for ROS 1 and ROS 2.

PointCloud2 rules (:func:`decode_pointcloud2`): fields of any PointField datatype at any offset,
``point_step``, ``row_step`` (row padding skipped), ``is_bigendian``; ``x``, ``y``, ``z`` required;
the intensity is the field named by the caller or the first of
:data:`~voxsparse.data.pointfile.INTENSITY_ALIASES` present (case-insensitive), else there is none;
points whose x, y or z is not finite (the empty cells of an organised cloud) are dropped and counted;
a non-finite intensity of a kept point, a field that overflows ``point_step``, data shorter or longer
than ``row_step * height`` are errors naming the topic and the field.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from voxsparse.data.pointfile import INTENSITY_ALIASES, PointCloud
from voxsparse.structures import INTENSITY_SCALES

__all__ = [
    "DriveError",
    "DriveSource",
    "DriveWriter",
    "Message",
    "decode_pointcloud2",
    "encode_pointcloud2",
    "matrix_to_quaternion",
    "new_message",
    "open_drive",
]

#: PointField datatype -> numpy type (sensor_msgs/PointField constants INT8 .. FLOAT64).
POINTFIELD_TYPES: dict[int, str] = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
_FLOAT32 = 7

POINTCLOUD2 = "sensor_msgs/msg/PointCloud2"


class DriveError(ValueError):
    """A drive (or one of its messages) that cannot be read or written as asked; the message names the
    file and, where it applies, the topic and the field."""


def normalize_msgtype(name: str) -> str:
    """``pkg/Type`` (ROS 1, MCAP schemas) as rosbags names it: ``pkg/msg/Type``."""
    parts = name.split("/")
    return f"{parts[0]}/msg/{parts[1]}" if len(parts) == 2 else name


# --- PointCloud2 ----------------------------------------------------------------------------------


def _pointcloud2_dtype(msg: Any, where: str, wanted: Sequence[str]) -> np.dtype:
    """The structured record of ``wanted`` fields, ``point_step`` bytes wide, in the message's byte order."""
    fields = {}
    for f in msg.fields:
        if f.name in fields:
            raise DriveError(f"{where}: field {f.name!r} is declared twice")
        fields[f.name] = f
    endian = ">" if msg.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for name in wanted:
        f = fields[name]
        if f.datatype not in POINTFIELD_TYPES:
            raise DriveError(f"{where}: field {name!r} has datatype {f.datatype}, expected one of 1-8 (INT8 .. FLOAT64)")
        if f.count < 1:
            raise DriveError(f"{where}: field {name!r} has count {f.count}, expected >= 1")
        code = np.dtype(endian + POINTFIELD_TYPES[f.datatype])
        if f.offset + code.itemsize > msg.point_step:
            raise DriveError(
                f"{where}: field {name!r} ({code.itemsize} bytes at offset {f.offset}) overflows point_step {msg.point_step}"
            )
        names.append(name)
        formats.append(code)
        offsets.append(f.offset)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": msg.point_step})


def intensity_field_of(field_names: Collection[str]) -> str | None:
    """The field read as intensity: the first of ``INTENSITY_ALIASES`` present, case-insensitively."""
    lower = {name.lower(): name for name in field_names}
    return next((lower[a] for a in INTENSITY_ALIASES if a in lower), None)


def decode_pointcloud2(
    msg: Any, where: str, intensity_field: str | None = None, intensity_scale: str | None = None
) -> tuple[PointCloud, int]:
    """A ``sensor_msgs/PointCloud2`` message as x, y, z [, intensity] float32 points.

    Args:
        msg: the decoded message (rosbags' class or anything with its fields).
        where: how errors name the message (file, topic, index).
        intensity_field: the field to read as intensity; None: the first known alias present (none: x, y, z only).
        intensity_scale: the intensity's scale (:data:`~voxsparse.structures.INTENSITY_SCALES`); None:
            ``uint8`` for a UINT8 field, else unknown.

    Returns:
        The cloud (``path`` is ``where``) and the number of points dropped for a non-finite x, y or z.

    Raises:
        DriveError: a missing field, a bad layout or size, a non-finite intensity (naming the field).
    """
    names = [f.name for f in msg.fields]
    missing = [n for n in ("x", "y", "z") if n not in names]
    if missing:
        raise DriveError(f"{where}: PointCloud2 lacks field(s) {missing}; it has {names}")
    if intensity_field is not None and intensity_field not in names:
        raise DriveError(f"{where}: no field {intensity_field!r} to read as intensity; it has {names}")
    if intensity_scale is not None and intensity_scale not in INTENSITY_SCALES:
        raise DriveError(f"{where}: intensity scale {intensity_scale!r}: expected one of {INTENSITY_SCALES}")
    intensity = intensity_field or intensity_field_of(names)
    wanted = ["x", "y", "z"] + ([intensity] if intensity else [])
    height, width, step, row_step = int(msg.height), int(msg.width), int(msg.point_step), int(msg.row_step)
    if step < 1:
        raise DriveError(f"{where}: point_step {step}: expected >= 1")
    record = _pointcloud2_dtype(msg, where, wanted)
    data = np.frombuffer(memoryview(msg.data).cast("B"), np.uint8)
    if height * width and row_step < width * step:
        raise DriveError(f"{where}: row_step {row_step} is less than width {width} x point_step {step}")
    if len(data) != row_step * height:
        raise DriveError(
            f"{where}: data holds {len(data)} bytes, expected row_step {row_step} x height {height} = {row_step * height}"
        )
    rows = data.reshape(height, row_step)[:, : width * step] if height * width else data[:0]
    records = np.ascontiguousarray(rows).reshape(-1).view(record) if height * width else np.zeros(0, record)
    columns = []
    for name in wanted:
        values = records[name].astype(np.float64)
        if np.abs(values[np.isfinite(values)]).max(initial=0.0) > np.finfo(np.float32).max:
            raise DriveError(f"{where}: field {name!r} holds values beyond the float32 range")
        columns.append(values.astype(np.float32))
    points = np.stack(columns, axis=1) if columns else np.zeros((0, len(wanted)), np.float32)
    finite = np.isfinite(points[:, :3]).all(axis=1)
    points = points[finite]
    if intensity and not np.isfinite(points[:, 3]).all():
        row = int(np.flatnonzero(~np.isfinite(points[:, 3]))[0])
        raise DriveError(f"{where}: field {intensity!r} is not finite at kept point {row} (x, y, z finite)")
    scale = intensity_scale
    if intensity and scale is None:
        datatype = next(f.datatype for f in msg.fields if f.name == intensity)
        scale = "uint8" if datatype == 2 else None
    features = ("x", "y", "z", "intensity") if intensity else ("x", "y", "z")
    cloud = PointCloud(points, features, scale if intensity else None, Path(where))
    return cloud, int((~finite).sum())


def encode_pointcloud2(
    typestore: Any, points: np.ndarray, features: Sequence[str], stamp_ns: int, frame_id: str
) -> Any:
    """A dense, little-endian FLOAT32 ``sensor_msgs/PointCloud2`` of (N, C) points named ``features``."""
    points = np.ascontiguousarray(points, dtype="<f4")
    if points.ndim != 2 or points.shape[1] != len(features):
        raise ValueError(f"points: expected (N, {len(features)}) for features {list(features)}, got {points.shape}")
    fields = [
        new_message(typestore, "sensor_msgs/msg/PointField", name=n, offset=4 * i, datatype=_FLOAT32, count=1)
        for i, n in enumerate(features)
    ]
    return new_message(
        typestore, POINTCLOUD2, header=header(typestore, stamp_ns, frame_id), height=1, width=len(points),
        fields=fields, is_bigendian=False, point_step=4 * len(features), row_step=4 * len(features) * len(points),
        data=points.reshape(-1).view(np.uint8), is_dense=True,
    )


# --- messages -------------------------------------------------------------------------------------


def _default(typestore: Any, desc: tuple) -> Any:
    """The zero value of a field description of rosbags' ``fielddefs``."""
    kind, spec = desc
    kind = int(kind)
    if kind == 1:  # base type: (name, max length)
        base = spec[0]
        return "" if base == "string" else False if base == "bool" else 0
    if kind == 2:  # a message
        return new_message(typestore, spec)
    inner, length = spec
    if int(inner[0]) == 1 and inner[1][0] != "string":
        return np.zeros(length if kind == 3 else 0, dtype=inner[1][0].replace("char", "uint8").replace("byte", "uint8"))
    return [_default(typestore, inner) for _ in range(length if kind == 3 else 0)]


def new_message(typestore: Any, msgtype: str, **values: Any) -> Any:
    """A ``msgtype`` message of ``typestore`` with ``values`` and zeros elsewhere (whatever fields the
    store's version of the type has)."""
    _, fields = typestore.fielddefs[msgtype]
    unknown = set(values) - {name for name, _ in fields}
    if unknown:
        raise ValueError(f"{msgtype}: no field(s) {sorted(unknown)}")
    args = {name: values[name] if name in values else _default(typestore, desc) for name, desc in fields}
    return typestore.types[msgtype](**args)


def stamp(typestore: Any, ns: int) -> Any:
    return new_message(typestore, "builtin_interfaces/msg/Time", sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def header(typestore: Any, ns: int, frame_id: str) -> Any:
    return new_message(typestore, "std_msgs/msg/Header", stamp=stamp(typestore, ns), frame_id=frame_id)


def stamp_ns(time: Any) -> int:
    """Nanoseconds of a ``builtin_interfaces/Time`` (ROS 1 times read the same through rosbags)."""
    return int(time.sec) * 1_000_000_000 + int(time.nanosec)


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """(4,) unit quaternion ``(w, x, y, z)`` of a (3, 3) rotation matrix, ``w >= 0``."""
    r = np.asarray(rotation, dtype=np.float64)
    # Each of the four squared components from the diagonal; the largest is divided by, for accuracy.
    squares = 0.25 * np.array([
        1 + r[0, 0] + r[1, 1] + r[2, 2], 1 + r[0, 0] - r[1, 1] - r[2, 2],
        1 - r[0, 0] + r[1, 1] - r[2, 2], 1 - r[0, 0] - r[1, 1] + r[2, 2],
    ])
    k = int(np.argmax(squares))
    big = math.sqrt(max(squares[k], 0.0))
    pairs = {  # 4 * q_k * q_j from the off-diagonal terms
        0: (r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]),
        1: (r[2, 1] - r[1, 2], r[0, 1] + r[1, 0], r[0, 2] + r[2, 0]),
        2: (r[0, 2] - r[2, 0], r[0, 1] + r[1, 0], r[1, 2] + r[2, 1]),
        3: (r[1, 0] - r[0, 1], r[0, 2] + r[2, 0], r[1, 2] + r[2, 1]),
    }[k]
    others = [v / (4 * big) for v in pairs]
    q = np.empty(4)
    q[k] = big
    q[[j for j in range(4) if j != k]] = others
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One message of a drive.

    Attributes:
        topic: its topic.
        log_time: nanoseconds, when it was recorded.
        msgtype: rosbags' name of its type (``pkg/msg/Type``).
        message: the decoded message.
    """

    topic: str
    log_time: int
    msgtype: str
    message: Any


class DriveSource:
    """The messages of a recorded drive, decoded; a context manager (see :func:`open_drive`)."""

    path: Path
    #: topic -> message type.
    topics: dict[str, str]

    def messages(self, topics: Collection[str]) -> Iterator[Message]:
        """The messages of ``topics`` in recording order."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_topic(self, topic: str, msgtypes: Collection[str], what: str) -> str:
        """``topic``'s type, which must be one of ``msgtypes``; else DriveError listing the drive's topics."""
        if topic not in self.topics:
            listing = ", ".join(f"{t} ({m})" for t, m in sorted(self.topics.items())) or "none"
            raise DriveError(f"drive {self.path}: no {what} topic {topic!r}; its topics: {listing}")
        msgtype = self.topics[topic]
        if msgtype not in msgtypes:
            raise DriveError(f"drive {self.path}: topic {topic!r} is {msgtype}, expected {' or '.join(sorted(msgtypes))}")
        return msgtype


class _RosbagsSource(DriveSource):
    def __init__(self, path: Path) -> None:
        from rosbags.highlevel import AnyReader, AnyReaderError
        from rosbags.rosbag1 import ReaderError as Reader1Error
        from rosbags.rosbag2 import ReaderError as Reader2Error
        from rosbags.typesys import Stores, get_typestore

        self.path = path
        self._error = AnyReaderError
        self._bad_file = (Reader1Error, Reader2Error, EOFError, OSError, struct.error)
        try:
            self._reader = AnyReader([path], default_typestore=get_typestore(Stores.LATEST))
            self._reader.open()
        except (AnyReaderError, KeyError, ValueError) as exc:
            raise DriveError(f"drive {path}: cannot be read as a ROS bag: {exc}") from None
        self.topics = {c.topic: c.msgtype for c in self._reader.connections}

    def messages(self, topics: Collection[str]) -> Iterator[Message]:
        connections = [c for c in self._reader.connections if c.topic in topics]
        if not connections:
            return
        messages = self._reader.messages(connections=connections)
        while True:
            try:
                connection, time, raw = next(messages)
            except StopIteration:
                return
            except self._bad_file as exc:
                raise DriveError(f"drive {self.path}: cannot be read on: {exc or type(exc).__name__}") from None
            try:
                message = self._reader.deserialize(raw, connection.msgtype)
            except self._error as exc:
                raise DriveError(f"drive {self.path}: topic {connection.topic!r}: undecodable message: {exc}") from None
            yield Message(connection.topic, time, connection.msgtype, message)

    def close(self) -> None:
        self._reader.close()


class _McapSource(DriveSource):
    def __init__(self, path: Path) -> None:
        from mcap.exceptions import McapError
        from mcap.reader import make_reader
        from rosbags.serde import SerdeError
        from rosbags.typesys import Stores, get_typestore

        self.path = path
        self._bad_bytes = (SerdeError, struct.error, IndexError, ValueError, UnicodeDecodeError)
        self._bad_file = (McapError, EOFError, OSError, struct.error)
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._typestore = get_typestore(Stores.EMPTY)
        try:
            self._reader = make_reader(self._file)
            summary = self._reader.get_summary()
            if summary is None or not summary.channels:  # unindexed: channels found by reading it once
                channels, schemas = {}, {}
                for schema, channel, _ in self._reader.iter_messages():
                    channels[channel.id], schemas[channel.schema_id] = channel, schema
            else:
                channels, schemas = summary.channels, summary.schemas
        except (*self._bad_file, ValueError) as exc:
            self._file.close()
            raise DriveError(f"drive {path}: not a readable MCAP file: {exc or type(exc).__name__}") from None
        self.topics, self._decoders = {}, {}
        for channel in channels.values():
            schema = schemas.get(channel.schema_id)
            self.topics[channel.topic] = normalize_msgtype(schema.name) if schema else f"({channel.message_encoding})"
            self._decoders[channel.topic] = (schema, channel.message_encoding)

    def _decoder(self, topic: str):
        from rosbags.typesys import get_types_from_idl, get_types_from_msg

        schema, encoding = self._decoders[topic]
        msgtype = self.topics[topic]
        kinds = {("ros2msg", "cdr"), ("ros2idl", "cdr"), ("ros1msg", "ros1")}
        if schema is None or (schema.encoding, encoding) not in kinds:
            got = "no schema" if schema is None else f"schema {schema.encoding!r}"
            raise DriveError(
                f"drive {self.path}: topic {topic!r} has {got} and message encoding {encoding!r}; readable: "
                "ROS 2 (ros2msg / ros2idl schemas, cdr) or ROS 1 (ros1msg, ros1) messages"
            )
        if msgtype not in self._typestore.types:
            text = schema.data.decode()
            types = get_types_from_idl(text) if schema.encoding == "ros2idl" else get_types_from_msg(text, msgtype)
            self._typestore.register(types)
        if encoding == "cdr":
            return lambda raw: self._typestore.deserialize_cdr(raw, msgtype)
        return lambda raw: self._typestore.deserialize_ros1(raw, msgtype)

    def messages(self, topics: Collection[str]) -> Iterator[Message]:
        decoders = {t: self._decoder(t) for t in topics if t in self.topics}
        if not decoders:
            return
        records = self._reader.iter_messages(topics=list(decoders), log_time_order=True)
        while True:
            try:
                _, channel, record = next(records)
            except StopIteration:
                return
            except self._bad_file as exc:  # a truncated recording, a compression without its module
                raise DriveError(f"drive {self.path}: cannot be read on: {exc or type(exc).__name__}") from None
            try:
                message = decoders[channel.topic](record.data)
            except self._bad_bytes as exc:
                raise DriveError(f"drive {self.path}: topic {channel.topic!r}: undecodable message: {exc}") from None
            yield Message(channel.topic, record.log_time, self.topics[channel.topic], message)

    def close(self) -> None:
        self._file.close()


def open_drive(path: str | Path) -> DriveSource:
    """A drive's messages: a ROS 1 ``.bag``, a ROS 2 bag folder (``metadata.yaml``), a ``.db3`` or an ``.mcap``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        DriveError: any other kind of file, or one its reader refuses.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"drive {path}: no such file or folder")
    if path.suffix == ".mcap" and path.is_file():
        return _McapSource(path)
    if (path.is_dir() and (path / "metadata.yaml").is_file()) or (path.is_file() and path.suffix in (".bag", ".db3")):
        return _RosbagsSource(path)
    raise DriveError(
        f"drive {path}: expected a ROS 1 .bag, a ROS 2 bag folder (with metadata.yaml), a .db3 or an .mcap file"
    )


# --- writing --------------------------------------------------------------------------------------


class DriveWriter:
    """A new recording: a ROS 1 ``.bag``, a ROS 2 bag folder (``storage`` sqlite3 or mcap) or a plain
    ROS 2 ``.mcap`` file (``profile ros2``, ``ros2msg`` schemas, cdr), chosen by ``kind``.

    Messages are built with :attr:`typestore` (:func:`new_message`): ROS 1 Noetic's types for a
    ``.bag``, ROS 2 Humble's otherwise. An existing ``path`` is refused.
    """

    KINDS = ("bag", "rosbag2", "mcap")

    def __init__(self, path: str | Path, kind: str, storage: str = "sqlite3") -> None:
        from rosbags.typesys import Stores, get_typestore

        self.path = Path(path)
        if kind not in self.KINDS:
            raise DriveError(f"drive writer: kind {kind!r}: expected one of {self.KINDS}")
        if self.path.exists():
            raise DriveError(f"drive {self.path}: exists already; give a new path")
        self.kind = kind
        self.typestore = get_typestore(Stores.ROS1_NOETIC if kind == "bag" else Stores.ROS2_HUMBLE)
        if "tf2_msgs/msg/TFMessage" not in self.typestore.types:  # rosbags' Noetic store lacks /tf's type
            from rosbags.typesys import get_types_from_msg

            self.typestore.register(get_types_from_msg("geometry_msgs/TransformStamped[] transforms", "tf2_msgs/msg/TFMessage"))
        self._channels: dict[str, tuple[Any, str]] = {}
        if kind == "bag":
            from rosbags.rosbag1 import Writer

            self._writer = Writer(self.path)
        elif kind == "rosbag2":
            from rosbags.rosbag2 import StoragePlugin, Writer

            if storage not in ("sqlite3", "mcap"):
                raise DriveError(f"drive {self.path}: storage {storage!r}: expected sqlite3 or mcap")
            plugin = StoragePlugin.SQLITE3 if storage == "sqlite3" else StoragePlugin.MCAP
            self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        else:
            from mcap.writer import Writer

            self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
            self._writer = Writer(self._file)
            self._writer.start(profile="ros2", library="voxsparse")
        if kind != "mcap":
            self._writer.open()

    def add_topic(self, topic: str, msgtype: str) -> None:
        if self.kind == "mcap":
            text = self.typestore.generate_msgdef(msgtype, ros_version=2)[0]
            schema = self._writer.register_schema(msgtype.replace("/msg/", "/"), "ros2msg", text.encode())
            channel = self._writer.register_channel(topic, "cdr", schema)
        else:
            channel = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
        self._channels[topic] = (channel, msgtype)

    def write(self, topic: str, log_time: int, message: Any) -> None:
        """Write ``message`` (of ``topic``'s type) recorded at ``log_time`` nanoseconds."""
        channel, msgtype = self._channels[topic]
        if self.kind == "bag":
            self._writer.write(channel, log_time, self.typestore.serialize_ros1(message, msgtype))
        elif self.kind == "rosbag2":
            self._writer.write(channel, log_time, self.typestore.serialize_cdr(message, msgtype))
        else:
            data = bytes(self.typestore.serialize_cdr(message, msgtype))
            self._writer.add_message(channel, log_time=log_time, data=data, publish_time=log_time)

    def close(self) -> None:
        if self.kind == "mcap":
            self._writer.finish()
            self._file.close()
        else:
            self._writer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
