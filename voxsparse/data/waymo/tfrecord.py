"""TFRecord files (the container of Waymo Open Dataset v1 segments), read and written without TensorFlow.

A TFRecord file is a plain sequence of records, each framed as (TensorFlow's
``tensorflow/core/lib/io/record_writer.cc`` and ``tsl/lib/hash/crc32c.h``)::

    uint64 length, little-endian | uint32 masked CRC32C of those 8 bytes | length bytes | uint32 masked CRC32C of them

where ``mask(crc) = ((crc >> 15) | (crc << 17)) + 0xA282EAD8`` modulo 2**32. Both checksums are
verified on reading; a truncated or corrupt record raises :class:`TFRecordError` naming the file,
the record and its byte offset, never a shortened or damaged payload. CRC32C comes from
``google-crc32c`` (Google's C implementation, several GB/s).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import google_crc32c

from voxsparse.utils.io import atomic_write

__all__ = ["TFRecordError", "iter_records", "masked_crc32c", "write_records"]

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_CRC = struct.Struct("<I")  # masked CRC of the data


class TFRecordError(ValueError):
    """A TFRecord file that is truncated or fails a checksum."""


def masked_crc32c(data: bytes) -> int:
    """TensorFlow's masked CRC32C of ``data`` (an unsigned 32-bit integer)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def iter_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Yield the payload of every record of the TFRecord file ``path``, in order.

    Raises:
        TFRecordError: the file ends inside a record, or a length or data checksum does not match
            (message: file, record index, byte offset of the record).
    """
    path = Path(path)
    with open(path, "rb") as f:
        index, offset = 0, 0
        while True:
            header = f.read(_HEADER.size)
            if not header:
                return
            where = f"{path}: record {index} at byte offset {offset}"
            if len(header) < _HEADER.size:
                raise TFRecordError(f"{where}: truncated header ({len(header)} of {_HEADER.size} bytes)")
            length, length_crc = _HEADER.unpack(header)
            # Check the length before trusting it to size a read.
            if masked_crc32c(header[:8]) != length_crc:
                raise TFRecordError(f"{where}: corrupt record length (CRC mismatch)")
            data = f.read(length)
            footer = f.read(_CRC.size)
            if len(data) < length or len(footer) < _CRC.size:
                got = len(data) + len(footer)
                raise TFRecordError(
                    f"{where}: truncated record: expected {length + _CRC.size} bytes after the header, "
                    f"the file ends after {got}"
                )
            if masked_crc32c(data) != _CRC.unpack(footer)[0]:
                raise TFRecordError(f"{where}: corrupt record data (CRC mismatch over {length} bytes)")
            yield data
            index += 1
            offset += _HEADER.size + length + _CRC.size


def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> Path:
    """Write ``records`` as a TFRecord file at ``path`` (atomically: all records or no file)."""

    def write(f) -> None:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length)
            f.write(_CRC.pack(masked_crc32c(length)))
            f.write(data)
            f.write(_CRC.pack(masked_crc32c(data)))

    return atomic_write(path, write)
