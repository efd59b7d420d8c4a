"""llamalab.checkpoint.gguf_header against the reference reader, gguf-py's GGUFReader.

The metadata must come out exactly as ``{k: f.contents() for k, f in GGUFReader(p).fields.items()}``
gives it (values and Python types, also of list elements), the tensor table with the same names,
type ids, ggml-order dims, absolute offsets and sizes. Broken files give a ValueError that names
the problem, never an IndexError or struct.error.
"""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llamalab.checkpoint.base import CheckpointError  # noqa: E402
from llamalab.checkpoint.gguf_header import GGUFHeader, TensorInfo, read_gguf_header  # noqa: E402

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType


class _Reference(gguf.GGUFReader):
    """gguf-py's reader, unchanged except that its byte reads go through a plain ndarray view of
    its np.memmap (as llamalab's own reader does): np.memmap's per-slice bookkeeping makes the
    real model's vocabulary take ~4 s instead of ~1 s. The parsing is gguf-py's own code."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        mapped = self.data
        if self.__dict__.get("_mapped") is not mapped:
            self._mapped, self._plain = mapped, mapped.view(np.ndarray)
        self.data = self._plain
        try:
            return super()._get(offset, dtype, count, override_order)
        finally:
            self.data = mapped


def _reference(path: Path) -> tuple[dict[str, Any], Any]:
    reader = _Reference(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


def _assert_same_value(ours: Any, ref: Any, key: str) -> None:
    assert type(ours) is type(ref), f"{key}: {type(ours).__name__} != {type(ref).__name__}"
    assert ours == ref, key
    if isinstance(ref, list):
        assert [type(v) for v in ours] == [type(v) for v in ref], f"{key}: element types differ"


def _assert_matches_reference(header: GGUFHeader, path: Path) -> None:
    fields, reader = _reference(path)
    assert list(header.fields) == list(fields)
    for key, ref in fields.items():
        _assert_same_value(header.fields[key], ref, key)
    ref_tensors = [TensorInfo(name=t.name, type_id=int(t.tensor_type), dims=tuple(int(d) for d in t.shape),
                              offset=int(t.data_offset), nbytes=int(t.n_bytes)) for t in reader.tensors]
    assert header.tensors == ref_tensors
    assert all(type(d) is int for t in header.tensors for d in t.dims)
    assert header.data_offset == reader.data_offset
    assert header.alignment == reader.alignment
    assert header.version == reader.fields["GGUF.version"].contents()


def _rejected_by_gguf_py(path: Path) -> bool:
    try:
        reader = gguf.GGUFReader(path)
        for f in reader.fields.values():
            f.contents()
    except Exception:
        return True
    return False


# --- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model() -> Path:
    from llamalab.checkpoint.registry import resolve

    try:
        return resolve("smollm2-135m-instruct")
    except CheckpointError as e:
        pytest.skip(str(e))


def test_real_model_matches_gguf_py(real_model: Path) -> None:
    header = read_gguf_header(real_model)
    _assert_matches_reference(header, real_model)
    assert len(header.fields["tokenizer.ggml.tokens"]) == header.fields["llama.vocab_size"] == 49152
    assert isinstance(header.fields["llama.rope.freq_base"], float)
    names = {t.name for t in header.tensors}
    assert "blk.0.attn_q.weight" in names and "token_embd.weight" in names


# --- synthetic files written by gguf-py -------------------------------------------------------

SCALARS: list[tuple[str, str, Any]] = [
    ("add_uint8", "t.uint8", 255),
    ("add_int8", "t.int8", -128),
    ("add_uint16", "t.uint16", 65535),
    ("add_int16", "t.int16", -32768),
    ("add_uint32", "t.uint32", 2**32 - 1),
    ("add_int32", "t.int32", -(2**31)),
    ("add_float32", "t.float32", 3.14159),  # not exactly representable: read back as float32's double
    ("add_uint64", "t.uint64", 2**64 - 1),
    ("add_int64", "t.int64", -(2**63)),
    ("add_float64", "t.float64", math.pi),
    ("add_bool", "t.bool_true", True),
    ("add_bool", "t.bool_false", False),
    ("add_string", "t.string", "hello"),
    ("add_string", "t.non_ascii", "héllo wörld — 日本語 🦙"),
]
ARRAYS: list[tuple[str, list[Any], Any]] = [
    ("t.ints", [1, -2, 3], None),
    ("t.floats", [0.5, -1.25, 1e-7, float("inf")], None),
    ("t.strings", ["a", "", "ü", "🦙", "two words"], None),
    ("t.bools", [True, False, True], None),
    ("t.nested_ints", [[1, 2], [3, 4, 5]], None),
    ("t.nested_strings", [["a", "b"], ["c"]], None),
    ("t.deep", [[[1], [2, 3]], [[4]]], None),
    ("t.mixed_nested", [[1, 2], ["ab", "c"]], None),  # gguf-py's flattening: the strings become byte values
    ("t.uint8s", [0, 255], VT.UINT8),
    ("t.int16s", [-32768, 32767], VT.INT16),
    ("t.uint64s", [0, 2**64 - 1], VT.UINT64),
    ("t.int64s", [-(2**63), 2**63 - 1], VT.INT64),
    ("t.float64s", [math.e, -0.0], VT.FLOAT64),
]
TOKENS = [f"tok{i}" if i % 7 else f"ŧøķ{i}" for i in range(300)]


def _write_synthetic(path: Path, alignment: int | None = 64) -> Path:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for method, key, value in SCALARS:
        getattr(w, method)(key, value)
    for key, value, sub_type in ARRAYS:
        if sub_type is None:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, VT.ARRAY, sub_type=sub_type)
    w.add_token_list(TOKENS)
    w.add_tensor("t.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((7,)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), QT.Q8_0)
    w.add_tensor("t.q8", q8, raw_dtype=QT.Q8_0)
    w.add_tensor("t.i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_synthetic(tmp_path_factory.mktemp("gguf") / "synthetic.gguf")


def test_synthetic_file_matches_gguf_py(synthetic: Path) -> None:
    header = read_gguf_header(synthetic)
    _assert_matches_reference(header, synthetic)
    f = header.fields
    for _, key, value in SCALARS:
        if key != "t.float32":
            _assert_same_value(f[key], value, key)
    assert f["t.float32"] == float(np.float32(3.14159))
    assert f["t.nested_ints"] == [1, 2, 3, 4, 5] and f["t.nested_strings"] == ["a", "b", "c"]
    assert f["t.mixed_nested"] == [1, 2, ord("a"), ord("b"), ord("c")]
    assert f["t.deep"] == [1, 2, 3, 4]
    assert f["tokenizer.ggml.tokens"] == TOKENS
    assert header.alignment == 64 and header.data_offset % 64 == 0
    assert [t.name for t in header.tensors] == ["t.f32", "blk.0.attn_q.weight", "t.q8", "t.i32"]
    by_name = {t.name: t for t in header.tensors}
    assert by_name["t.f32"].dims == (5, 3) and by_name["t.f32"].type_id == int(QT.F32)  # ggml order
    assert by_name["t.q8"].dims == (64, 4) and by_name["t.q8"].nbytes == 4 * 2 * 34
    assert all(t.offset % 64 == 0 for t in header.tensors)
    data = synthetic.read_bytes()
    t = by_name["t.f32"]
    ref = _reference(synthetic)[1].tensors[0].data
    assert np.array_equal(np.frombuffer(data, np.float32, 15, t.offset).reshape(3, 5), ref)


def test_default_alignment(tmp_path: Path) -> None:
    path = _write_synthetic(tmp_path / "a32.gguf", alignment=None)
    header = read_gguf_header(path)
    assert header.alignment == 32 and "general.alignment" not in header.fields
    _assert_matches_reference(header, path)


# --- hand-written files: what GGUFWriter cannot write -----------------------------------------


def _s(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _array(etype: int, items: list[bytes]) -> bytes:
    return struct.pack("<IQ", etype, len(items)) + b"".join(items)


def _raw_gguf(kvs: list[bytes], version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, 0, len(kvs)) + b"".join(kvs)


def test_hand_written_values_match_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "raw.gguf"
    path.write_bytes(_raw_gguf([
        _kv("empty.ints", VT.ARRAY, _array(VT.INT32, [])),
        _kv("empty.strings", VT.ARRAY, _array(VT.STRING, [])),
        _kv("empty.arrays", VT.ARRAY, _array(VT.ARRAY, [])),
        _kv("nested.first_empty", VT.ARRAY, _array(VT.ARRAY, [_array(VT.INT32, []),
                                                               _array(VT.INT32, [struct.pack("<i", 7)])])),
        _kv("empty.string", VT.STRING, _s("")),
        _kv("bool.two", VT.BOOL, b"\x02"),
        _kv("float32.inf", VT.FLOAT32, struct.pack("<f", -math.inf)),
        _kv("uint16s", VT.ARRAY, _array(VT.UINT16, [struct.pack("<H", v) for v in (1, 65535)])),
        _kv("int8s", VT.ARRAY, _array(VT.INT8, [struct.pack("<b", v) for v in (-1, 127)])),
        _kv("uint32s", VT.ARRAY, _array(VT.UINT32, [struct.pack("<I", v) for v in (0, 2**32 - 1)])),
        _kv("float32s", VT.ARRAY, _array(VT.FLOAT32, [struct.pack("<f", v) for v in (0.1, 2.5)])),
    ], version=2))
    header = read_gguf_header(path)
    _assert_matches_reference(header, path)
    assert header.version == 2 and header.tensors == []
    assert header.fields["empty.ints"] == [] and header.fields["empty.string"] == ""
    assert header.fields["nested.first_empty"] == [7] and header.fields["bool.two"] is True


def test_invalid_utf8_is_refused_like_gguf_py(tmp_path: Path) -> None:
    for name, kv in [("value", _kv("bad", VT.STRING, _s(b"ok\xff"))),
                     ("element", _kv("bad", VT.ARRAY, _array(VT.STRING, [_s("fine"), _s(b"\xc3")]))),
                     ("key", _kv(b"b\xe4d", VT.UINT8, b"\x00"))]:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(_raw_gguf([kv]))
        assert _rejected_by_gguf_py(path)
        with pytest.raises(ValueError, match=r"invalid UTF-8 in .* at byte \d+"):
            read_gguf_header(path)


# --- broken files -----------------------------------------------------------------------------


def _tensor_type_position(data: bytes, name: str) -> int:
    """Byte offset of the ggml type id in the tensor info of ``name``."""
    start = data.index(_s(name)) + len(_s(name))
    (n_dims,) = struct.unpack_from("<I", data, start)
    return start + 4 + 8 * n_dims


def _broken(kind: str, good: bytes, header: GGUFHeader) -> bytes:
    if kind == "magic":
        return b"GGML" + good[4:]
    if kind == "version 1":
        return good[:4] + struct.pack("<I", 1) + good[8:]
    if kind == "big-endian":
        return good[:4] + struct.pack(">I", 3) + good[8:]
    if kind == "truncated kv":
        return good[:good.index(_s("tok150"))]
    if kind == "string past the end":
        at = good.index(_s("tok150"))
        return good[:at] + struct.pack("<Q", 10**9) + good[at + 8:]
    if kind == "truncated tensor data":
        last = header.tensors[-1]
        return good[:last.offset + last.nbytes - 1]
    if kind == "unknown value type":
        return _raw_gguf([_kv("a", VT.UINT8, b"\x01"), _kv("weird", 13, b"\x00")])
    if kind == "unknown array element type":
        return _raw_gguf([_kv("weird.array", VT.ARRAY, struct.pack("<IQ", 42, 1))])
    if kind == "unknown tensor type":
        at = _tensor_type_position(good, "blk.0.attn_q.weight")
        return good[:at] + struct.pack("<I", 99) + good[at + 4:]
    if kind == "duplicate key":
        return _raw_gguf([_kv("a", VT.UINT8, b"\x01"), _kv("a", VT.UINT8, b"\x02")])
    if kind == "alignment type":
        return _raw_gguf([_kv("general.alignment", VT.UINT64, struct.pack("<Q", 64))])
    if kind == "alignment value":
        return _raw_gguf([_kv("general.alignment", VT.UINT32, struct.pack("<I", 48))])
    if kind == "empty":
        return b""
    if kind == "short":
        return b"GG"
    raise AssertionError(kind)


BROKEN = {
    "magic": r"^not a GGUF file \(magic b'GGML'\)$",
    "version 1": r"^unsupported GGUF version 1$",
    "big-endian": r"^unsupported GGUF version 50331648 \(a big-endian file\?",
    "truncated kv": (r"^truncated at byte \d+ while reading key 'tokenizer\.ggml\.tokens' "
                     r"\(\d+ bytes needed at byte \d+\)$"),
    "string past the end": r"^truncated at byte \d+ while reading key 'tokenizer\.ggml\.tokens' \(element 150\)",
    "truncated tensor data": r"^tensor t\.i32: data ends at byte \d+, the file has \d+$",
    "unknown value type": r"^key 'weird': unknown value type id 13 at byte \d+$",
    "unknown array element type": r"^key 'weird\.array': unknown array element type id 42 at byte \d+$",
    "unknown tensor type": r"^tensor blk\.0\.attn_q\.weight: unknown ggml type id 99$",
    "duplicate key": r"^duplicate metadata key 'a' at byte \d+$",
    "alignment type": r"^general\.alignment has type uint64, expected uint32$",
    "alignment value": r"^general\.alignment is 48, not a non-zero power of two$",
    "empty": r"^not a GGUF file \(magic b'', the file has 0 bytes\)$",
    "short": r"^not a GGUF file \(magic b'GG', the file has 2 bytes\)$",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_file_raises_value_error(kind: str, synthetic: Path, tmp_path: Path) -> None:
    good = synthetic.read_bytes()
    path = tmp_path / "broken.gguf"
    path.write_bytes(_broken(kind, good, read_gguf_header(synthetic)))
    assert _rejected_by_gguf_py(path)  # the reference agrees the file is bad
    with pytest.raises(ValueError, match=BROKEN[kind]):
        read_gguf_header(path)


def test_truncated_anywhere_in_the_header_is_a_value_error(synthetic: Path, tmp_path: Path) -> None:
    good = synthetic.read_bytes()
    header = read_gguf_header(synthetic)
    path = tmp_path / "cut.gguf"
    rng = random.Random(99)  # every cut in the fixed header, then a sample of the rest (each cut costs ~1 ms)
    for n in [*range(64), *sorted(rng.sample(range(64, header.data_offset), 250))]:
        path.write_bytes(good[:n])
        with pytest.raises(ValueError, match=r"truncated|not a GGUF file|data ends at byte"):
            read_gguf_header(path)


def test_corrupted_bytes_give_a_value_error_or_a_header(synthetic: Path, tmp_path: Path) -> None:
    good = synthetic.read_bytes()
    end = read_gguf_header(synthetic).data_offset
    rng = random.Random(1234)
    path = tmp_path / "corrupt.gguf"
    for _ in range(250):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(end)] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            read_gguf_header(path)
        except ValueError as e:  # anything else (IndexError, struct.error, ...) fails the test
            assert not str(e).startswith("corrupt GGUF header"), e  # nor may the safety net be what caught it
