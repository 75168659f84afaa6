"""core/gguf_file.py: every value type and tensor view against what gguf's writer wrote and gguf's reader
reads; every corrupt or cut header a one-line ModelFileError naming the file.

Good files are written here with gguf's own GGUFWriter; broken ones are packed by hand (struct), so each
case breaks exactly one field of the layout.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType as VT, GGUFWriter, GGMLQuantizationType as QT

from core.errors import ModelFileError, UnsupportedModelError
from core.gguf_file import StringArray, contents, metadata_from_buffer, open_gguf, read_metadata

STRINGS = ["", "a", "héllo", "<|begin_of_text|>", "Ġthe", "▁world", "x" * 300]


def write_all_types(path: Path) -> dict[str, np.ndarray]:
    """A GGUF with one key of every value type, alignment 64 and four tensors; returns the tensors."""
    w = GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    for vt, value in [(VT.UINT8, 200), (VT.INT8, -100), (VT.UINT16, 60000), (VT.INT16, -30000),
                      (VT.UINT32, 4_000_000_000), (VT.INT32, -2_000_000_000), (VT.FLOAT32, 0.1),
                      (VT.UINT64, 2**63 + 5), (VT.INT64, -(2**62)), (VT.FLOAT64, 0.1), (VT.BOOL, True),
                      (VT.STRING, "snow ☃")]:
        w.add_key_value(f"t.{vt.name.lower()}", value, vt)
    w.add_key_value("a.u8", [0, 255, 7], VT.ARRAY, VT.UINT8)
    w.add_key_value("a.i32", [-1, 2, -3], VT.ARRAY, VT.INT32)
    w.add_key_value("a.f32", [0.5, -1.25, 0.1], VT.ARRAY, VT.FLOAT32)
    w.add_key_value("a.u64", [2**64 - 1, 0], VT.ARRAY, VT.UINT64)
    w.add_key_value("a.bool", [True, False, True], VT.ARRAY, VT.BOOL)
    w.add_key_value("a.str", STRINGS, VT.ARRAY, VT.STRING)
    w.add_key_value("a.nested", [[1, 2], [3]], VT.ARRAY, VT.ARRAY)
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
               "f16": rng.standard_normal((2, 7)).astype(np.float16),
               "i32": rng.integers(-9, 9, (4,), dtype=np.int32),
               "q8_0": rng.integers(0, 255, (2, 3 * 34), dtype=np.uint8)}           # 2 rows of 3 blocks
    for name, arr in tensors.items():
        w.add_tensor(name, arr, raw_dtype=QT.Q8_0 if name == "q8_0" else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def all_types(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "all.gguf"
    return path, write_all_types(path)


def test_every_value_type_reads_as_written(all_types):
    path, _ = all_types
    meta = open_gguf(path).metadata
    assert meta["t.uint8"] == 200 and meta["t.int8"] == -100 and meta["t.uint16"] == 60000
    assert meta["t.int16"] == -30000 and meta["t.uint32"] == 4_000_000_000 and meta["t.int32"] == -2_000_000_000
    assert meta["t.float32"] == float(np.float32(0.1)) and meta["t.float64"] == 0.1
    assert meta["t.uint64"] == 2**63 + 5 and meta["t.int64"] == -(2**62)
    assert meta["t.bool"] is True and meta["t.string"] == "snow ☃".encode()
    assert meta["a.u8"].dtype == np.uint8 and meta["a.u8"].tolist() == [0, 255, 7]
    assert meta["a.i32"].dtype == np.int32 and meta["a.i32"].tolist() == [-1, 2, -3]
    assert meta["a.f32"].dtype == np.float32 and meta["a.f32"].tolist() == np.float32([0.5, -1.25, 0.1]).tolist()
    assert meta["a.u64"].tolist() == [2**64 - 1, 0]
    assert meta["a.bool"].dtype == bool and meta["a.bool"].tolist() == [True, False, True]
    assert isinstance(meta["a.str"], StringArray) and meta["a.str"].tolist() == [s.encode() for s in STRINGS]
    assert [a.tolist() for a in meta["a.nested"]] == [[1, 2], [3]]
    assert meta["general.alignment"] == 64


def test_contents_and_tensors_equal_gguf_reader(all_types):
    path, _ = all_types
    f, ref = open_gguf(path), GGUFReader(path)
    assert (f.version, f.alignment, f.data_start) == (3, ref.alignment, ref.data_offset)
    for key, field in ref.fields.items():
        if not key.startswith("GGUF.") and key != "a.nested":           # gguf flattens nested arrays
            assert f.get(key) == field.contents(), key
    assert f.get("a.nested") == [[1, 2], [3]] and f.get("no.such.key", 5) == 5
    assert len(f.tensors) == len(ref.tensors)
    for t, r in zip(f.tensors, ref.tensors):
        assert (t.name, t.tensor_type, t.shape, t.n_elements, t.n_bytes, t.data_offset) == \
            (r.name, r.tensor_type, tuple(r.shape.tolist()), r.n_elements, r.n_bytes, r.data_offset)
        assert t.data.dtype == r.data.dtype and t.data.shape == r.data.shape and np.array_equal(t.data, r.data)


def test_tensor_views_hold_what_was_written_zero_copy(all_types):
    path, written = all_types
    f = open_gguf(path)
    for t in f.tensors:
        np.testing.assert_array_equal(t.data, written[t.name])
        assert t.data_offset % 64 == 0 and not t.data.flags.writeable
        assert np.shares_memory(t.data, f.data)                          # a view, not a copy
    assert f.tensors[3].tensor_type == QT.Q8_0 and f.tensors[3].shape == (96, 2)   # 3 blocks of 32 values
    assert bytes(f.header()) == path.read_bytes()[:f.data_start]


def test_read_metadata_and_buffer_give_the_same_values(all_types):
    path, _ = all_types
    lazy, eager = open_gguf(path).metadata, read_metadata(path)
    from_buffer = metadata_from_buffer(GGUFReader(path).data, str(path))
    assert list(lazy) == list(eager) == list(from_buffer)
    for key in lazy:
        assert contents(lazy[key]) == contents(eager[key]) == contents(from_buffer[key]), key
    assert eager["a.str"] == [s.encode() for s in STRINGS]               # read_metadata: plain list[bytes]


def test_string_array_indexing(all_types):
    arr = open_gguf(all_types[0]).metadata["a.str"]
    want = [s.encode() for s in STRINGS]
    assert len(arr) == len(want) and list(arr) == want
    assert arr[0] == b"" and arr[2] == "héllo".encode() and arr[-1] == want[-1]
    assert arr[1:4] == want[1:4] and arr[::-2] == want[::-2]
    with pytest.raises(IndexError):
        arr[len(want)]


# ---- broken files, packed by hand -----------------------------------------------------------------

def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name: str, dims: list[int], type_id: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", type_id, offset)


def pack(kvs: list[bytes] = (), tensors: list[bytes] = (), version: int = 3, magic: bytes = b"GGUF",
         data: int = 0) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32 + data)


U32 = struct.pack("<I", 7)
NESTED = b"".join(struct.pack("<IQ", VT.ARRAY, 1) for _ in range(12)) + struct.pack("<IQ", VT.UINT8, 0)
BROKEN = {
    "tiny": (b"GGUF\3\0\0\0", ModelFileError, "not a GGUF file (only 8 bytes)"),
    "magic": (pack(magic=b"GGML"), ModelFileError, "not a GGUF file (bad magic b'GGML')"),
    "version": (pack(version=1), ModelFileError, "GGUF version 1 is not supported"),
    "value_type": (pack([kv("k", 99, U32)]), ModelFileError, "metadata key 'k' has unknown value type 99"),
    "item_type": (pack([kv("k", VT.ARRAY, struct.pack("<IQ", 42, 1) + U32)]), ModelFileError,
                  "metadata array 'k' has unknown item type 42"),
    "duplicate_key": (pack([kv("k", VT.UINT32, U32)] * 2), ModelFileError, "metadata key 'k' appears twice"),
    "nested": (pack([kv("k", VT.ARRAY, NESTED)]), ModelFileError, "nested more than"),
    "key_utf8": (pack([kv(b"\xff\xfe", VT.UINT32, U32)]), ModelFileError, "corrupt GGUF header"),
    "dims": (pack(tensors=[tinfo("t", [1] * 5)]), ModelFileError, "tensor 't' has 5 dimensions"),
    "duplicate_tensor": (pack(tensors=[tinfo("t", [4]), tinfo("t", [4], offset=32)], data=64), ModelFileError,
                         "tensor 't' appears twice"),
    "alignment": (pack([kv("general.alignment", VT.UINT32, struct.pack("<I", 48))]), ModelFileError,
                  "alignment 48 is not a power of two"),
    "type_id": (pack(tensors=[tinfo("t", [4], type_id=1000)], data=32), UnsupportedModelError,
                "tensor 't' has unknown type id 1000"),
    "blocks": (pack(tensors=[tinfo("t", [33], type_id=QT.Q4_0)], data=64), ModelFileError,
               "row of 33 values is not a whole number of Q4_0 blocks of 32"),
    "past_eof": (pack(tensors=[tinfo("t", [4, 4])], data=32), ModelFileError,
                 "tensor 't' data ends at byte"),
    "huge_array": (pack([kv("k", VT.ARRAY, struct.pack("<IQ", VT.STRING, 1 << 38))]), ModelFileError,
                   "truncated file"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_header_is_one_line_naming_the_file(name, tmp_path):
    data, cls, words = BROKEN[name]
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    with pytest.raises(cls) as info:
        open_gguf(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and words in msg, msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="not a regular file"):
        read_metadata(tmp_path)


def test_read_metadata_does_not_read_the_tensor_table(tmp_path):
    path = tmp_path / "t.gguf"
    path.write_bytes(pack([kv("k", VT.UINT32, U32)], tensors=[tinfo("t", [1] * 5)]))
    assert read_metadata(path) == {"k": 7}
    with pytest.raises(ModelFileError, match="5 dimensions"):
        open_gguf(path)


def test_every_cut_inside_the_header_is_truncated(tmp_path):
    """Cutting a small file at every byte of its header: `truncated` (or `not a GGUF` under 24 bytes)."""
    # the string array comes last, so a cut inside its last string has no later read to trip on
    kvs = [kv("general.architecture", VT.STRING, s("llama")), kv("n", VT.UINT64, struct.pack("<Q", 9)),
           kv("f", VT.ARRAY, struct.pack("<IQ3f", VT.FLOAT32, 3, 1, 2, 3)),
           kv("v", VT.ARRAY, struct.pack("<IQ", VT.STRING, 3) + s("ab") + s("") + s("cde"))]
    head = pack(kvs, [tinfo("a", [8]), tinfo("b", [8, 2], offset=32)], data=96)
    path = tmp_path / "whole.gguf"
    path.write_bytes(head)
    assert [t.name for t in open_gguf(path).tensors] == ["a", "b"]
    kv_end = 24 + sum(map(len, kvs))
    for n in range(len(head) - 96):                                      # every cut before the data
        path.write_bytes(head[:n])
        with pytest.raises(ModelFileError, match="not a GGUF" if n < 24 else "truncated"):
            open_gguf(path)
        if n < kv_end:
            with pytest.raises(ModelFileError, match="not a GGUF" if n < 24 else "truncated"):
                read_metadata(path)
            with pytest.raises(ModelFileError, match="not a GGUF" if n < 24 else "truncated"):
                metadata_from_buffer(head[:n], "cut")
