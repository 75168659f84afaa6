"""Bad model files: each is a one-line error naming the file and the problem, from the API and the CLI.

The bad files are built here with gguf's own GGUFWriter (or cut from a good file), so each test breaks
exactly one thing.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter, GGMLQuantizationType as QT

from core.errors import LlamaMpiError, ModelFileError, UnsupportedModelError
from core.loader import open_model
from core.tools.synth import write_synthetic

REPO = Path(__file__).resolve().parents[1]


def build(path: Path, *, arch: str = "llama", drop: str = "", types: dict | None = None,
          shapes: dict | None = None) -> Path:
    """A 1-layer llama GGUF (n_embd 32, 4 heads, 2 KV heads, n_ff 64, vocab 300) with one thing broken."""
    n_embd, n_ff, n_vocab, kv = 32, 64, 300, 16
    w = GGUFWriter(path, arch)
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    plan = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,),
            "output.weight": (n_vocab, n_embd), "blk.0.attn_norm.weight": (n_embd,),
            "blk.0.attn_q.weight": (n_embd, n_embd), "blk.0.attn_k.weight": (kv, n_embd),
            "blk.0.attn_v.weight": (kv, n_embd), "blk.0.attn_output.weight": (n_embd, n_embd),
            "blk.0.ffn_norm.weight": (n_embd,), "blk.0.ffn_gate.weight": (n_ff, n_embd),
            "blk.0.ffn_up.weight": (n_ff, n_embd), "blk.0.ffn_down.weight": (n_embd, n_ff)}
    plan.update(shapes or {})
    rng = np.random.default_rng(0)
    for name, shape in plan.items():
        if name == drop:
            continue
        kind = (types or {}).get(name)
        if kind == "i32":
            w.add_tensor(name, rng.integers(-5, 5, size=shape, dtype=np.int32))
        elif kind == "q8_1":                                             # a GGML type we do not run
            block, type_size = GGML_QUANT_SIZES[QT.Q8_1]
            n_bytes = int(np.prod(shape)) // block * type_size
            w.add_tensor(name, np.zeros((shape[0], n_bytes // shape[0]), np.uint8), raw_dtype=QT.Q8_1)
        else:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("bad") / "good.gguf")


def test_the_builder_makes_a_valid_model(good):
    assert open_model(good).config.n_layer == 1


def cut(src: Path, dst: Path, n: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n])
    return dst


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bad_case(name: str, good: Path, tmp: Path) -> tuple[Path, type, str]:
    """(file, error class, words the message must contain) of one broken file."""
    size = good.stat().st_size
    make = {
        "missing": lambda: (tmp / "does-not-exist.gguf", ModelFileError, "no such file"),
        "empty": lambda: (write(tmp / "empty.gguf", b""), ModelFileError, "not a GGUF"),
        "not_gguf": lambda: (write(tmp / "notes.gguf", b"a text file, not a model\n" * 10),
                             ModelFileError, "not a GGUF"),
        "truncated_header": lambda: (cut(good, tmp / "head.gguf", 200), ModelFileError, "truncated"),
        "data_past_eof": lambda: (cut(good, tmp / "tail.gguf", size - 100), ModelFileError, "past the end"),
        "arch": lambda: (build(tmp / "arch.gguf", arch="gpt2"), UnsupportedModelError, "architecture 'gpt2'"),
        "type_i32": lambda: (build(tmp / "i32.gguf", types={"blk.0.ffn_up.weight": "i32"}),
                             UnsupportedModelError, "type I32"),
        "type_q8_1": lambda: (build(tmp / "q81.gguf", types={"blk.0.attn_q.weight": "q8_1"}),
                              UnsupportedModelError, "type Q8_1"),
        "shape": lambda: (build(tmp / "shape.gguf", shapes={"blk.0.attn_k.weight": (32, 32)}),
                          UnsupportedModelError, "blk.0.attn_k.weight"),
        "missing_tensor": lambda: (build(tmp / "drop.gguf", drop="blk.0.ffn_gate.weight"),
                                   ModelFileError, "'blk.0.ffn_gate.weight' is missing"),
    }
    return make[name]()


CASES = ["missing", "empty", "not_gguf", "truncated_header", "data_past_eof", "arch", "type_i32",
         "type_q8_1", "shape", "missing_tensor"]


@pytest.mark.parametrize("name", CASES)
def test_open_model_raises_one_line_error(name, good, tmp_path):
    path, cls, words = bad_case(name, good, tmp_path)
    with pytest.raises(cls) as info:
        open_model(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg and words in msg, msg


@pytest.mark.parametrize("name", ["missing", "not_gguf", "data_past_eof", "arch", "type_q8_1", "shape"])
def test_eval_cli_prints_one_error_line(name, good, tmp_path):
    path, _, words = bad_case(name, good, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "core.tools.eval", "-m", str(path), "--tokens", "1,2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr


def test_every_truncation_point_is_an_error_not_a_crash(tmp_path):
    """Cutting a real model anywhere gives a LlamaMpiError (never IndexError, never a hang)."""
    src = write_synthetic(tmp_path / "t.gguf", "tiny", "q4_0", n_layer=1, n_vocab=300)
    data = src.read_bytes()
    header_end = 300 * 12 + 4000                                         # well inside the header and data
    for n in sorted({1, 4, 8, 23, 24, 40, 100, 1000, 3000, header_end, len(data) // 2, len(data) - 1}):
        (tmp_path / "cut.gguf").write_bytes(data[:n])
        with pytest.raises(LlamaMpiError):
            open_model(tmp_path / "cut.gguf")


def test_bad_token_ids_are_a_usage_error(good):
    proc = subprocess.run([sys.executable, "-m", "core.tools.eval", "-m", str(good), "--tokens", "1,x"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --tokens") and "Traceback" not in proc.stderr


def test_absurd_counts_in_a_small_header_fail_fast(tmp_path):
    """Corrupt counts (2^38 strings, 2^30 keys) in a tiny file: an error at once, not a long walk."""
    import struct
    key = struct.pack("<Q", 1) + b"a"
    huge_array = struct.pack("<IIQQ", 0x46554747, 3, 0, 1) + key + struct.pack("<IIQ", 9, 8, 1 << 38)
    many_keys = struct.pack("<IIQQ", 0x46554747, 3, 0, 1 << 30) + key + struct.pack("<IB", 0, 1)
    for data in (huge_array + b"\0" * 4096, many_keys + b"\0" * 4096):
        (tmp_path / "x.gguf").write_bytes(data)
        with pytest.raises(ModelFileError, match="truncated|corrupt"):
            open_model(tmp_path / "x.gguf")
