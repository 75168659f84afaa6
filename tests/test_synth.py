"""core.tools.synth: files gguf's reader accepts, weights gguf dequantizes to sane values, SPM vocab, CLI."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize as gguf_dequantize

from core.errors import UsageError
from core.loader import open_model
from core.tools.synth import TYPES, spm_vocab, write_synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("qtype", list(TYPES))
def test_every_type_gives_finite_weights_of_the_planned_scale(qtype, tmp_path):
    path = write_synthetic(tmp_path / f"{qtype}.gguf", "tiny", qtype, n_layer=1)
    model = open_model(path)                                             # validates shapes and types
    t = model.tensor("blk.0.ffn_down.weight")                            # n_in = n_ff = 768
    assert t.tensor_type == TYPES[qtype][0]
    w = gguf_dequantize(t.data, t.tensor_type).astype(np.float64)
    assert w.shape == (256, 768) and np.isfinite(w).all()
    target = 768 ** -0.5
    assert abs(w.std() / target - 1) < 0.1, w.std()
    assert abs(w.mean()) < 0.05 * target
    norm = np.asarray(model.tensor("blk.0.attn_norm.weight").data)
    assert abs(norm.mean() - 1) < 0.05


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()      # noqa: E731
    a = write_synthetic(tmp_path / "a.gguf", "tiny", "q4_k", n_layer=1, seed=5)
    b = write_synthetic(tmp_path / "b.gguf", "tiny", "q4_k", n_layer=1, seed=5)
    c = write_synthetic(tmp_path / "c.gguf", "tiny", "q4_k", n_layer=1, seed=6)
    assert digest(a) == digest(b) != digest(c)


def test_spm_vocab_layout():
    tokens, scores, types = spm_vocab(32000)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 32000
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>"
    assert types[0] == TokenType.UNKNOWN and types[1] == TokenType.CONTROL
    assert set(types[3:259]) == {TokenType.BYTE} and set(types[259:]) == {TokenType.NORMAL}
    assert scores[259:] == sorted(scores[259:], reverse=True)
    # every multi-character piece is the merge of two shorter pieces (SPM merges by score)
    vocab = set(tokens)
    for piece in tokens[259:2000]:
        if len(piece) > 1:
            assert any(piece[:i] in vocab and piece[i:] in vocab for i in range(1, len(piece))), piece


def test_tinyllama_preset_shapes_and_metadata(tmp_path):
    path = write_synthetic(tmp_path / "tl.gguf", "tinyllama", "q4_0", n_layer=1)
    c = open_model(path).config
    assert (c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.n_vocab, c.n_layer) == (2048, 5632, 32, 4, 32000, 1)
    r = GGUFReader(path)
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is True


def test_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown preset"):
        write_synthetic(tmp_path / "x.gguf", "gpt9", "f32")
    with pytest.raises(UsageError, match="unknown type"):
        write_synthetic(tmp_path / "x.gguf", "tiny", "q9_9")
    with pytest.raises(UsageError, match="divisible by 256"):
        write_synthetic(tmp_path / "x.gguf", "tiny", "q4_k", n_embd=96, n_head=4, n_head_kv=2)


def test_cli_writes_a_loadable_file(tmp_path):
    out = tmp_path / "cli.gguf"
    proc = subprocess.run([sys.executable, "-m", "core.tools.synth", str(out), "--preset", "tiny", "--type", "q6_k",
                           "--n-layer", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert open_model(out).config.n_layer == 1
    bad = subprocess.run([sys.executable, "-m", "core.tools.synth", str(out), "--type", "q4_k", "--n-embd", "96"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
