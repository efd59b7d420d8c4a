"""A fast reader for the header of a GGUF file: its metadata and its tensor table.

``gguf.GGUFReader`` (gguf-py) builds a few numpy objects for every part of every value it
reads. A vocabulary is one array of ~50k strings and its BPE merges another; on the 98 MB
SmolLM2-135M file that is ~250k tiny numpy arrays and 2-4 s before the first tensor can be
looked at. This module parses the same bytes with ``struct`` on a read-only memory map:
numeric arrays are decoded with one ``numpy.frombuffer(...).tolist()`` each, string arrays
with a tight loop, and the whole header of that file takes a few tens of milliseconds.

The metadata comes out exactly as llamalab got it from gguf-py, i.e. equal (values and
Python types) to::

    {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}

scalars as Python ``int``/``float``/``bool``/``str``, arrays as flat Python lists (gguf-py
flattens arrays of arrays, and so does this reader). Strings must be valid UTF-8, as in
gguf-py (which decodes strictly). Only little-endian GGUF v2/v3 files are read.

Every problem with the file's contents is a ``ValueError`` whose message names what is wrong
and where (the byte offset, the key or the tensor); the path is left to the caller.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_MAX_NESTING = 64  # arrays of arrays deeper than this are refused (rather than a RecursionError)

# GGUF metadata value type ids.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)

_TYPE_NAMES = {UINT8: "uint8", INT8: "int8", UINT16: "uint16", INT16: "int16", UINT32: "uint32",
               INT32: "int32", FLOAT32: "float32", BOOL: "bool", STRING: "string", ARRAY: "array",
               UINT64: "uint64", INT64: "int64", FLOAT64: "float64"}
_SCALAR_STRUCTS: dict[int, struct.Struct] = {
    UINT8: struct.Struct("<B"), INT8: struct.Struct("<b"), UINT16: struct.Struct("<H"),
    INT16: struct.Struct("<h"), UINT32: struct.Struct("<I"), INT32: struct.Struct("<i"),
    FLOAT32: struct.Struct("<f"), BOOL: struct.Struct("<?"), UINT64: struct.Struct("<Q"),
    INT64: struct.Struct("<q"), FLOAT64: struct.Struct("<d"),
}
_NUMPY_DTYPES: dict[int, np.dtype] = {
    UINT8: np.dtype("<u1"), INT8: np.dtype("<i1"), UINT16: np.dtype("<u2"), INT16: np.dtype("<i2"),
    UINT32: np.dtype("<u4"), INT32: np.dtype("<i4"), FLOAT32: np.dtype("<f4"), BOOL: np.dtype("?"),
    UINT64: np.dtype("<u8"), INT64: np.dtype("<i8"), FLOAT64: np.dtype("<f8"),
}
_U32 = _SCALAR_STRUCTS[UINT32]
_U64 = _SCALAR_STRUCTS[UINT64]


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF file's tensor table."""

    name: str
    type_id: int  # a gguf.GGMLQuantizationType value
    dims: tuple[int, ...]  # ggml order, fastest-varying first, exactly as stored
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


@dataclass
class GGUFHeader:
    """A GGUF file's header: metadata, tensor table and where the tensor data starts."""

    version: int
    fields: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int  # absolute offset of the (aligned) data section
    alignment: int


class _Parser:
    """Reads GGUF values from ``buf`` (a bytes-like object supporting slicing and the buffer protocol)."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def truncated(self, what: str, need: int, at: int) -> ValueError:
        return ValueError(f"truncated at byte {self.size} while reading {what} "
                          f"({need} bytes needed at byte {at})")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.truncated(what, n, self.pos)

    def u32(self, what: str) -> int:
        self.need(4, what)
        value = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        value = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def raw_string(self, what: str) -> tuple[int, int]:
        """A string's (start, end) byte span; the position moves past it."""
        n = self.u64(what)
        self.need(n, what)
        start = self.pos
        self.pos += n
        return start, start + n

    def decode(self, start: int, end: int, what: str) -> str:
        try:
            return self.buf[start:end].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"invalid UTF-8 in {what} at byte {start + e.start}") from None

    def string(self, what: str) -> str:
        start, end = self.raw_string(what)
        return self.decode(start, end, what)

    def value_type(self, what: str, kind: str = "value type") -> int:
        at = self.pos
        vtype = self.u32(what)
        if vtype not in _TYPE_NAMES:
            raise ValueError(f"{what}: unknown {kind} id {vtype} at byte {at}")
        return vtype

    def value(self, vtype: int, key: str) -> Any:
        """One metadata value of type ``vtype`` (already read), as gguf-py's ``contents()`` gives it."""
        what = f"key {key!r}"
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            return self.array(key)
        fmt = _SCALAR_STRUCTS[vtype]
        self.need(fmt.size, what)
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos += fmt.size
        return value

    def array(self, key: str) -> list[Any]:
        what = f"key {key!r}"
        etype = self.value_type(what, "array element type")
        count = self.u64(what)
        if etype == STRING:
            return self.string_array(count, key)
        if etype == ARRAY:
            return self.nested_array(count, key)
        dtype = _NUMPY_DTYPES[etype]
        nbytes = count * dtype.itemsize
        self.need(nbytes, what)
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
        self.pos += nbytes
        return values

    def string_array(self, count: int, key: str) -> list[str]:
        buf, size, pos = self.buf, self.size, self.pos
        if pos + 8 * count > size:  # every string takes at least its 8-byte length
            raise self.truncated(f"key {key!r}", 8 * count, pos)
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        i = 0
        try:
            for i in range(count):
                end = pos + 8 + unpack(buf, pos)[0]  # struct.error past the end of the file
                if end > size:
                    raise self.truncated(f"key {key!r} (element {i})", end - pos - 8, pos + 8)
                append(buf[pos + 8:end].decode("utf-8"))
                pos = end
        except UnicodeDecodeError as e:
            raise ValueError(f"invalid UTF-8 in key {key!r} (element {i}) at byte {pos + 8 + e.start}") from None
        except struct.error:
            raise self.truncated(f"key {key!r} (element {i})", 8, pos) from None
        self.pos = pos
        return out

    def nested_array(self, count: int, key: str) -> list[Any]:
        """An array of arrays, flattened as gguf-py's ``ReaderField.contents()`` flattens it.

        gguf-py takes the element type from the chain of first elements (``types[-1]``) and
        converts every leaf by that type: leaves are decoded as UTF-8 strings if it is
        ``string``, otherwise numbers are kept and a string contributes its bytes as ints.
        """
        what = f"key {key!r}"
        leaves: list[tuple[int, int, int]] = []  # (value type, start, end)
        chain = [ARRAY]
        for i in range(count):
            sub = self.walk(ARRAY, what, leaves, 1)
            if i == 0:
                chain += sub
        buf = self.buf
        if chain[-1] == STRING:
            return [self.decode(start, end, what) for _, start, end in leaves]
        out: list[Any] = []
        for vtype, start, end in leaves:
            if vtype == STRING:
                out.extend(buf[start:end])
            else:
                out.append(_SCALAR_STRUCTS[vtype].unpack_from(buf, start)[0])
        return out

    def walk(self, vtype: int, what: str, leaves: list[tuple[int, int, int]], depth: int) -> list[int]:
        """Skip one value of type ``vtype``, noting its leaves; returns its gguf-py type chain."""
        if vtype == STRING:
            start, end = self.raw_string(what)
            leaves.append((STRING, start, end))
            return [STRING]
        if vtype != ARRAY:
            n = _SCALAR_STRUCTS[vtype].size
            self.need(n, what)
            leaves.append((vtype, self.pos, self.pos + n))
            self.pos += n
            return [vtype]
        if depth > _MAX_NESTING:
            raise ValueError(f"{what}: arrays nested deeper than {_MAX_NESTING} levels at byte {self.pos}")
        etype = self.value_type(what, "array element type")
        count = self.u64(what)
        if self.pos + count > self.size:  # every element takes at least one byte
            raise self.truncated(what, count, self.pos)
        chain = [ARRAY]
        for i in range(count):
            sub = self.walk(etype, what, leaves, depth + 1)
            if i == 0:
                chain += sub
        return chain


def _quant_sizes() -> tuple[Any, Any]:
    # gguf-py is imported only when a header is read: it takes ~0.3 s to import.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES, GGMLQuantizationType


def _parse(buf: Any, size: int) -> GGUFHeader:
    quant_sizes, quant_type = _quant_sizes()
    p = _Parser(buf, size)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise ValueError(f"not a GGUF file (magic {magic!r})")
    p.pos = 4
    version = p.u32("the GGUF version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file? only little-endian GGUF is read)" if version & 0xFFFF == 0 else ""
        raise ValueError(f"unsupported GGUF version {version}{hint}")
    n_tensors = p.u64("the tensor count")
    n_kv = p.u64("the metadata key count")

    fields: dict[str, Any] = {}
    seen: set[str] = set()
    alignment_type: int | None = None
    for i in range(n_kv):
        at = p.pos
        key = p.string(f"the name of metadata key #{i}")
        if key in seen:
            raise ValueError(f"duplicate metadata key {key!r} at byte {at}")
        seen.add(key)
        vtype = p.value_type(f"key {key!r}")
        value = p.value(vtype, key)
        if key == "general.alignment":
            alignment_type = vtype
        if not key.startswith("GGUF."):  # gguf-py's own pseudo-fields; llamalab never kept these
            fields[key] = value

    alignment = DEFAULT_ALIGNMENT
    if alignment_type is not None:
        if alignment_type != UINT32:
            raise ValueError(f"general.alignment has type {_TYPE_NAMES[alignment_type]}, expected uint32")
        alignment = fields["general.alignment"]
        if alignment == 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment is {alignment}, not a non-zero power of two")

    infos: list[tuple[str, int, tuple[int, ...], int]] = []
    for i in range(n_tensors):
        name = p.string(f"the name of tensor #{i}")
        what = f"the info of tensor {name}"
        n_dims = p.u32(what)
        p.need(8 * n_dims, what)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, p.pos)
        p.pos += 8 * n_dims
        type_id = p.u32(what)
        rel_offset = p.u64(what)
        infos.append((name, type_id, dims, rel_offset))

    data_offset = -(-p.pos // alignment) * alignment
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for name, type_id, dims, rel_offset in infos:
        if name in names:
            raise ValueError(f"duplicate tensor name {name}")
        names.add(name)
        try:
            qtype = quant_type(type_id)
        except ValueError:
            raise ValueError(f"tensor {name}: unknown ggml type id {type_id}") from None
        block_size, type_size = quant_sizes[qtype]
        n_elements = 1
        for d in dims:
            n_elements *= d
        if block_size > 1 and (not dims or dims[0] % block_size):
            raise ValueError(f"tensor {name}: first dimension {dims[0] if dims else None} of shape {list(dims)} "
                             f"is not a multiple of {qtype.name}'s block size {block_size}")
        nbytes = n_elements // block_size * type_size
        offset = data_offset + rel_offset
        if offset + nbytes > size:
            raise ValueError(f"tensor {name}: data ends at byte {offset + nbytes}, the file has {size}")
        tensors.append(TensorInfo(name=name, type_id=type_id, dims=dims, offset=offset, nbytes=nbytes))
    return GGUFHeader(version=version, fields=fields, tensors=tensors, data_offset=data_offset, alignment=alignment)


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the header of the GGUF file at ``path`` (v2 or v3, little-endian).

    The metadata equals what gguf-py's ``GGUFReader(...).fields[k].contents()`` gives (values
    and types), the tensor table lists each tensor with its absolute data offset and size.
    Raises ValueError, naming the problem and where it is, for anything that is not a readable
    GGUF header (and OSError if the file cannot be opened).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(GGUF_MAGIC):
            raise ValueError(f"not a GGUF file (magic {f.read()!r}, the file has {size} bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(mm, size)
    except (struct.error, IndexError, OverflowError, RecursionError) as e:
        # A safety net: the parser checks every read, so this should not happen.
        raise ValueError(f"corrupt GGUF header ({type(e).__name__}: {e})") from None
    finally:
        try:
            mm.close()
        except BufferError:  # a numpy view still alive (in a traceback): the map closes when it goes
            pass
