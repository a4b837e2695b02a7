"""A fast, bounds-checked reader for GGUF headers (metadata and tensor table only).

``gguf.GGUFReader`` builds a numpy view per array element: 16 s for Gemma's 262k-token
vocabulary. Validation runs before every load, so this reader walks the header with
``struct`` instead, skipping arrays it is not asked for, and keeps ``gguf``'s own type tables
(value types, quantisation block sizes) as the single source of truth. Every read is bounds
checked, so junk or truncated input raises :class:`HeaderError` instead of reading garbage.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_SCALARS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MAX_COUNT = 1 << 40  # no real file has this many keys, tensors or array items


class HeaderError(Exception):
    """The header is malformed; ``truncated`` tells whether it simply ran past the end of the file."""

    def __init__(self, message: str, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


@dataclass
class ArrayRef:
    """An array left unread: where it is, so it can be read on demand."""

    item_type: GGUFValueType
    count: int
    offset: int


@dataclass
class TensorEntry:
    name: str
    shape: list[int]
    type: GGMLQuantizationType
    offset: int  # from the start of the data section
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars and small arrays; big arrays as ArrayRef
    tensors: list[TensorEntry] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    @property
    def data_end(self) -> int:
        """Where the last tensor's bytes end; past ``file_size`` means a truncated file."""
        return max((self.data_offset + t.offset + t.n_bytes for t in self.tensors), default=self.data_offset)


class _Cursor:
    def __init__(self, buf: memoryview | mmap.mmap | bytes, pos: int = 0) -> None:
        self.buf, self.pos, self.size = buf, pos, len(buf)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(f"header ends early: needs byte {self.pos + n:,} of a {self.size:,}-byte file",
                              truncated=True)

    def unpack(self, st: struct.Struct) -> Any:
        self.need(st.size)
        value = st.unpack_from(self.buf, self.pos)[0]
        self.pos += st.size
        return value

    def count(self, what: str) -> int:
        n = self.unpack(_U64)
        if n > _MAX_COUNT:
            raise HeaderError(f"implausible {what} count {n:,}: corrupt header")
        return n

    def string(self) -> str:
        n = self.count("string length")
        self.need(n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.count("string length")
        self.need(n)
        self.pos += n

    def value(self, vtype: GGUFValueType, *, keep_arrays_up_to: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = _value_type(self.unpack(_U32))
            n = self.count("array item")
            start = self.pos
            if n <= keep_arrays_up_to:
                return [self.value(item_type, keep_arrays_up_to=0) for _ in range(n)]
            if item_type in _SCALARS:
                self.need(n * _SCALARS[item_type].size)
                self.pos += n * _SCALARS[item_type].size
            elif item_type == GGUFValueType.STRING:
                for _ in range(n):
                    self.skip_string()
            else:
                for _ in range(n):
                    self.value(item_type, keep_arrays_up_to=0)
            return ArrayRef(item_type, n, start)
        raise HeaderError(f"unknown GGUF value type {vtype}")


def _value_type(raw: int) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise HeaderError(f"unknown GGUF value type {raw}: corrupt header") from None


def tensor_nbytes(qtype: GGMLQuantizationType, shape: list[int]) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    if shape and shape[0] % block:
        raise HeaderError(f"tensor row of {shape[0]} elements is not a multiple of {qtype.name}'s block {block}")
    return n // block * type_size


def read_header(path: Path, *, keep_arrays_up_to: int = 64) -> GGUFHeader:
    """Parse the header of ``path``. Arrays longer than ``keep_arrays_up_to`` come back as ArrayRef."""
    with path.open("rb") as fh:
        size = path.stat().st_size
        if size < 24:
            raise HeaderError(f"only {size} bytes: too short for a GGUF header", truncated=True)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, size, keep_arrays_up_to)


def _parse(buf: Any, size: int, keep: int) -> GGUFHeader:
    cur = _Cursor(buf)
    cur.need(4)
    if bytes(buf[:4]) != b"GGUF":
        raise HeaderError("no GGUF magic")
    cur.pos = 4
    version = cur.unpack(_U32)
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.count("tensor")
    n_kv = cur.count("metadata key")
    header = GGUFHeader(version=version, file_size=size)
    for _ in range(n_kv):
        key = cur.string()
        vtype = _value_type(cur.unpack(_U32))
        header.metadata[key] = cur.value(vtype, keep_arrays_up_to=keep)
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack(_U32)
        if n_dims > 8:
            raise HeaderError(f"tensor {name!r} claims {n_dims} dimensions: corrupt header")
        shape = [cur.unpack(_U64) for _ in range(n_dims)]
        raw_type = cur.unpack(_U32)
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise HeaderError(f"tensor {name!r} has unknown type {raw_type}") from None
        offset = cur.unpack(_U64)
        header.tensors.append(TensorEntry(name, shape, qtype, offset, tensor_nbytes(qtype, shape)))
    alignment = header.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise HeaderError(f"bad general.alignment {alignment!r}")
    header.data_offset = (cur.pos + alignment - 1) // alignment * alignment
    return header


def read_string_array(path: Path, ref: ArrayRef, limit: int | None = None) -> list[str]:
    """Read (the first ``limit`` items of) a string array left unread by :func:`read_header`."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cur = _Cursor(mm, ref.offset)
        n = ref.count if limit is None else min(limit, ref.count)
        return [cur.string() for _ in range(n)]
