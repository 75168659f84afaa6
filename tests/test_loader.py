"""open_model on good files: metadata, tensors, fingerprint; and the memory a layer range costs.

Memory is measured in a fresh subprocess (VmRSS from /proc) so other tests' allocations do not count.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize as gguf_dequantize

from core.loader import open_model
from core.tools.synth import write_synthetic

REPO = Path(__file__).resolve().parents[1]

# Prints the RSS growth (MB) of building Stage(range(a, b)) and running one token through it.
RSS_PROBE = """
import json, sys
import numpy as np
from core.loader import open_model
from core.model import Stage
def rss_mb():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024
path, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = rss_mb()
model = open_model(path)
opened = rss_mb()
cfg = model.config
stage = Stage(model, range(a, b), embed=a == 0, head=b == cfg.n_layer, n_ctx=16)
loaded = rss_mb()
h = stage.embed([1]) if a == 0 else np.ones((1, cfg.n_embd), np.float32)
out = stage.forward(h, 0)
if b == cfg.n_layer:
    stage.logits(out)
print(json.dumps({"base": base, "opened": opened, "loaded": loaded, "after_token": rss_mb(),
                  "weight_bytes": stage.weight_bytes}))
"""


def rss_probe(path: Path, a: int, b: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), str(a), str(b)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_metadata_and_tensor_views(fixtures):
    m = open_model(fixtures / "models" / "fx256-q4_0.gguf")
    assert m.get("general.architecture") == "llama"
    assert m.get("llama.block_count") == 3
    assert m.get("no.such.key", "dflt") == "dflt"
    assert len(m.get("tokenizer.ggml.tokens")) == 1000
    t = m.tensor("blk.1.attn_q.weight")
    assert isinstance(t.data, np.memmap) or isinstance(t.data.base, np.memmap)   # zero-copy view
    assert gguf_dequantize(t.data, t.tensor_type).shape == (256, 256)
    assert m.has("output.weight") and not m.has("blk.3.attn_q.weight")


@pytest.mark.parametrize("name", ["llama-2-tiny-random.gguf", "stories260K.gguf", "fx256-iq4_xs.gguf"])
def test_metadata_and_tensors_equal_gguf_readers(fixtures, name):
    """Our parser keeps string arrays lazy; every key and tensor must read exactly as gguf's own reader."""
    m = open_model(fixtures / "models" / name)
    ref = GGUFReader(fixtures / "models" / name)
    header = {k: ref.fields.pop(k).contents() for k in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")}
    assert header == {"GGUF.version": m.reader.version, "GGUF.tensor_count": len(m.reader.tensors),
                      "GGUF.kv_count": len(m.reader.metadata)}
    assert list(m.reader.metadata) == list(ref.fields)
    for key, field in ref.fields.items():
        assert m.get(key) == field.contents() and type(m.get(key)) is type(field.contents()), key
        if field.types[0] == GGUFValueType.ARRAY and field.types[-1] == GGUFValueType.STRING:
            assert m.reader.metadata[key][:] == [field.parts[i].tobytes() for i in field.data], key
    assert [(t.name, t.data_offset) for t in m.reader.tensors] == [(t.name, t.data_offset) for t in ref.tensors]
    for t, r in zip(m.reader.tensors, ref.tensors):
        assert (t.tensor_type, t.shape, t.n_bytes) == (r.tensor_type, tuple(r.shape.tolist()), r.n_bytes), t.name
        assert t.data.dtype == r.data.dtype and t.data.shape == r.data.shape, t.name
        assert np.array_equal(t.data, r.data), t.name


def test_fingerprint_is_stable_and_tells_files_apart(fixtures, tmp_path):
    a = open_model(fixtures / "models" / "fx256-q4_0.gguf")
    assert a.fingerprint() == open_model(fixtures / "models" / "fx256-q4_0.gguf").fingerprint()
    assert a.fingerprint() != open_model(fixtures / "models" / "fx256-q4_1.gguf").fingerprint()
    copy = tmp_path / "copy.gguf"
    copy.write_bytes((fixtures / "models" / "fx256-q4_0.gguf").read_bytes())
    assert open_model(copy).fingerprint() == a.fingerprint()
    assert a.fingerprint().startswith(f"{copy.stat().st_size}-")


def test_release_keeps_data_readable(fixtures):
    m = open_model(fixtures / "models" / "fx256-f32.gguf")
    before = np.array(m.tensor("output.weight").data)
    m.release("output.weight")
    np.testing.assert_array_equal(np.asarray(m.tensor("output.weight").data), before)


@pytest.fixture(scope="module")
def eight_layers(tmp_path_factory) -> Path:
    """8 layers of ~12 MB of Q8_0 each, tiny vocab: big enough to see per-layer RSS."""
    return write_synthetic(tmp_path_factory.mktemp("mem") / "eight.gguf", "tiny", "q8_0", n_layer=8,
                           n_embd=1024, n_ff=2816, n_head=8, n_head_kv=2, n_vocab=512)


def test_a_layer_range_costs_only_its_share_of_memory(eight_layers):
    model = open_model(eight_layers)
    per_layer = sum(int(t.n_bytes) for t in model.reader.tensors if t.name.startswith("blk.0.")) / 2**20
    whole = rss_probe(eight_layers, 0, 8)
    part = rss_probe(eight_layers, 2, 4)                                 # 2 of 8 layers, no embd/head
    grow_whole = whole["after_token"] - whole["opened"]
    grow_part = part["after_token"] - part["opened"]
    assert grow_whole >= 0.8 * 8 * per_layer, whole                     # the measurement sees the weights
    assert grow_whole <= 1.4 * 8 * per_layer + 20, whole
    assert grow_part <= 1.4 * 2 * per_layer + 10, (part, per_layer)
    assert grow_part <= 0.4 * grow_whole, (part, whole)


def test_tinyllama_q4_0_rss_within_budget(tmp_path):
    """Issue 2: RSS after loading the TinyLlama-shaped Q4_0 file <= 1.2 x file size + 150 MB."""
    path = write_synthetic(tmp_path / "tinyllama-q4_0.gguf", "tinyllama", "q4_0")
    size_mb = path.stat().st_size / 2**20
    probe = rss_probe(path, 0, 22)
    assert probe["loaded"] <= 1.2 * size_mb + 150, (probe, size_mb)
    assert probe["after_token"] <= 1.2 * size_mb + 150, (probe, size_mb)
