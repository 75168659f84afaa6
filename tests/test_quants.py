"""core.quants against gguf-py (the reference for every format's meaning) and against float64 matmuls.

Random blocks are random bytes whose f16 fields are overwritten with random finite f16 values (normal,
subnormal, zero, negative), so every bit pattern of codes and sub-block scales occurs.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as ref_dequantize

from core.errors import UnsupportedModelError
from core.quants import SUPPORTED_TYPES, TilePool, dequantize, make_qtensor

BLOCK_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
               QT.IQ4_NL, QT.IQ4_XS]
FLOAT_TYPES = [QT.F32, QT.F16, QT.BF16]
# byte offsets of the f16 fields in each block (ggml's block_* structs)
F16_FIELDS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
              QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208],
              QT.IQ4_NL: [0], QT.IQ4_XS: [0]}
# Q4_1 / Q5_1 keep their f16 mins as f32 beside d (24 and 28 bytes per 20- and 24-byte block): casting them
# per product cost more than the rest of a small product (core/quants/NOTES.md, "Small products").
MAX_RATIO = {qt: 1.15 for qt in BLOCK_TYPES} | {QT.Q6_K: 1.35, QT.Q4_1: 1.20, QT.Q5_1: 1.17}


def random_f16_bits(rng, shape, scale_like: bool) -> np.ndarray:
    """Finite f16 bit patterns; scale_like keeps magnitudes of real scales (~1e-4..1e-1) mostly."""
    if scale_like:
        v = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, -1, shape)).astype(np.float16)
        v.reshape(-1)[::17] = 0
        bits = v.view(np.uint16)
        bits.reshape(-1)[1::23] = rng.integers(0, 0x400, bits.reshape(-1)[1::23].shape)   # subnormals
        return bits
    bits = rng.integers(0, 1 << 16, shape).astype(np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF                                           # no inf/nan
    return bits


def random_blocks(qt: QT, n_out: int, n_in: int, seed: int = 0, scale_like: bool = True) -> np.ndarray:
    """(n_out, row_bytes) uint8 rows of random valid blocks of type qt."""
    rng = np.random.default_rng(seed)
    bs, ts = GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, (n_out, n_in // bs, ts), dtype=np.uint8)
    for at in F16_FIELDS[qt]:
        b[:, :, at:at + 2] = random_f16_bits(rng, b.shape[:2], scale_like).view(np.uint8).reshape(*b.shape[:2], 2)
    return b.reshape(n_out, -1)


def random_floats(qt: QT, n_out: int, n_in: int, seed: int = 0) -> np.ndarray:
    """GGUFReader-like data for float types (BF16 as raw bytes, like the reader gives)."""
    w = np.random.default_rng(seed).standard_normal((n_out, n_in)).astype(np.float32)
    if qt == QT.F32:
        return w
    if qt == QT.F16:
        return w.astype(np.float16)
    return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_out, 2 * n_in)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---- dequantization --------------------------------------------------------------------------------
@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scale_like", [True, False], ids=["scales", "anyf16"])
def test_dequantize_random_blocks_bit_exact(qt, scale_like):
    data = random_blocks(qt, 24, 1024, seed=qt.value, scale_like=scale_like)
    with np.errstate(all="ignore"):
        assert same_bits(dequantize(data, qt), ref_dequantize(data, qt).astype(np.float32))


@pytest.mark.parametrize("qt", FLOAT_TYPES, ids=lambda t: t.name)
def test_dequantize_floats_bit_exact(qt):
    data = random_floats(qt, 5, 64)
    assert same_bits(dequantize(data, qt), np.asarray(ref_dequantize(data, qt), dtype=np.float32))


def test_dequantize_keeps_leading_shape():
    data = random_blocks(QT.Q4_K, 6, 512).reshape(2, 3, -1)
    assert dequantize(data, QT.Q4_K).shape == (2, 3, 512)
    assert dequantize(data[0, 0], QT.Q4_K).shape == (512,)


@pytest.mark.parametrize("qt", BLOCK_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_get_rows_bit_exact(qt):
    n_out, n_in = 45, 512
    data = random_blocks(qt, n_out, n_in, seed=3) if qt in BLOCK_TYPES else random_floats(qt, n_out, n_in)
    ref = np.asarray(ref_dequantize(data, qt), dtype=np.float32).reshape(n_out, n_in)
    ids = np.array([44, 0, 7, 7, 31])
    got = make_qtensor(qt, data, (n_out, n_in)).get_rows(ids)
    assert same_bits(got, ref[ids])


# ---- products --------------------------------------------------------------------------------------
def check_matmul(qt: QT, n_out: int, n_in: int, T: int, pool=None) -> None:
    data = random_blocks(qt, n_out, n_in, seed=T) if qt in BLOCK_TYPES else random_floats(qt, n_out, n_in)
    w = np.asarray(ref_dequantize(data, qt), dtype=np.float64).reshape(n_out, n_in)
    x = np.random.default_rng(T + 1).standard_normal((T, n_in)).astype(np.float32)
    got = make_qtensor(qt, data, (n_out, n_in)).matmul(x, pool=pool)
    want = x.astype(np.float64) @ w.T
    bound = np.abs(x).astype(np.float64) @ np.abs(w).T                  # sum |x||w| per output
    assert got.shape == (T, n_out) and got.dtype == np.float32
    err = np.abs(got - want)
    assert np.all(err <= 2e-6 * bound + 1e-30), f"max rel err {np.max(err / (bound + 1e-30)):.2e}"


@pytest.mark.parametrize("T", [1, 3, 17], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("qt", BLOCK_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_matmul_matches_float64(qt, T):
    # 1100 rows: a full and a partial row tile; 768 columns: several column tiles; odd row counts too
    check_matmul(qt, 1100, 768, T)
    check_matmul(qt, 13, 256, T)


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda t: t.name)
def test_small_tiles_matmul_and_get_rows(qt, monkeypatch):
    """Many row and column tiles (tiny tile sizes): products and lookups across tile borders."""
    import core.quants.qtensor as qtensor_module
    monkeypatch.setattr(qtensor_module, "ROW_TILE", 64)
    monkeypatch.setattr(qtensor_module, "TILE_ELEMS", 64 * 64)
    check_matmul(qt, 200, 512, 1)
    check_matmul(qt, 200, 512, 6)
    data = random_blocks(qt, 200, 512, seed=9)
    ids = np.array([199, 63, 64, 0, 128, 127, 64])
    ref = ref_dequantize(data, qt).astype(np.float32).reshape(200, 512)
    assert same_bits(make_qtensor(qt, data, (200, 512)).get_rows(ids), ref[ids])


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q6_K, QT.F16], ids=lambda t: t.name)
def test_matmul_thread_pool_identical(qt):
    n_out, n_in = 1100, 512
    data = random_blocks(qt, n_out, n_in) if qt in BLOCK_TYPES else random_floats(qt, n_out, n_in)
    qtensor = make_qtensor(qt, data, (n_out, n_in))
    with TilePool(2) as pool:
        for T in (1, 9):
            x = np.random.default_rng(T).standard_normal((T, n_in)).astype(np.float32)
            assert np.array_equal(qtensor.matmul(x, pool=pool), qtensor.matmul(x))


# ---- memory and errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda t: t.name)
def test_repacked_memory_ratio(qt):
    n_out, n_in = 1000, 4096
    data = random_blocks(qt, n_out, n_in)
    qtensor = make_qtensor(qt, data, (n_out, n_in))
    ratio = qtensor.nbytes / data.nbytes
    assert ratio <= MAX_RATIO[qt], f"{qt.name}: {ratio:.3f}x"


def test_float_types_are_not_copied():
    data = random_floats(QT.F16, 64, 256)
    qtensor = make_qtensor(QT.F16, data, (64, 256))
    assert qtensor.nbytes == data.nbytes and np.shares_memory(qtensor._rows, data)


@pytest.mark.parametrize("qt", [QT.IQ2_XXS, QT.Q8_1, QT.TQ1_0, QT.MXFP4], ids=lambda t: t.name)
def test_unsupported_type_is_named(qt):
    assert qt not in SUPPORTED_TYPES
    with pytest.raises(UnsupportedModelError, match=qt.name):
        make_qtensor(qt, np.zeros((4, 64), np.uint8), (4, 256))
    with pytest.raises(UnsupportedModelError, match=qt.name):
        dequantize(np.zeros((4, 64), np.uint8), qt)


def test_wrong_byte_count_is_an_error():
    with pytest.raises(Exception, match="Q4_0"):
        make_qtensor(QT.Q4_0, np.zeros((4, 17), np.uint8), (4, 32))


def test_supported_types_are_the_issue_list():
    names = {t.name for t in SUPPORTED_TYPES}
    assert names == {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                     "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}


# ---- every tensor of every fixture model -----------------------------------------------------------
def fixture_models() -> list[str]:
    from conftest import FIXTURES
    index = FIXTURES / "index.json"
    if not index.is_file():
        return []
    return sorted({case["model"] for case in json.loads(index.read_text())["cases"]})


@pytest.mark.parametrize("model", fixture_models(), ids=lambda m: m.split("/")[-1])
def test_fixture_tensors_bit_exact(fixtures, model):
    reader = gguf.GGUFReader(fixtures / model)
    types = set()
    for t in reader.tensors:
        types.add(t.tensor_type)
        ref = np.asarray(ref_dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert same_bits(dequantize(t.data, t.tensor_type), ref), t.name
        if len(t.shape) == 2:
            shape = (int(t.shape[1]), int(t.shape[0]))             # numpy order (n_out, n_in)
            qtensor = make_qtensor(t.tensor_type, t.data, shape)
            ids = np.array([0, shape[0] - 1, shape[0] // 2])
            assert same_bits(qtensor.get_rows(ids), ref.reshape(shape)[ids]), t.name
            x = np.random.default_rng(0).standard_normal((2, shape[1])).astype(np.float32)
            want = x.astype(np.float64) @ ref.reshape(shape).T.astype(np.float64)
            bound = np.abs(x).astype(np.float64) @ np.abs(ref.reshape(shape)).T
            assert np.all(np.abs(qtensor.matmul(x) - want) <= 2e-6 * bound + 1e-30), t.name
    assert types <= SUPPORTED_TYPES
