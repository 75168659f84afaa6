"""ModelConfig from metadata: llama.cpp's defaults, GQA, rope dims and scaling, and its one-line errors.

Expected values come from the fixtures' index.json (written from llama.cpp's own hparams) or from the
metadata dicts written here.
"""
from __future__ import annotations

import pytest

from conftest import fixture_case_ids
from core.config import ModelConfig
from core.errors import ModelFileError, UnsupportedModelError
from core.loader import open_model

BASE = {"general.architecture": "llama", "llama.embedding_length": 4096, "llama.block_count": 32,
        "llama.feed_forward_length": 11008, "llama.attention.head_count": 32}


def config(extra: dict | None = None, drop: str = "", has_output: bool = True) -> ModelConfig:
    meta = {k: v for k, v in {**BASE, **(extra or {})}.items() if k != drop}
    return ModelConfig.from_fields(meta.get, has_output, n_vocab_rows=32000, path="m.gguf")


def test_llama2_defaults_like_llama_cpp():
    c = config()
    assert (c.n_head_kv, c.head_dim, c.n_rot) == (32, 128, 128)          # kv heads = heads, rot = head size
    assert c.rope_freq_base == 10000.0 and c.rope_freq_scale == 1.0
    assert c.norm_eps == pytest.approx(1e-5) and c.n_vocab == 32000 and not c.tied_output
    assert c.n_gqa == 1 and c.n_embd_kv == 4096


def test_codellama_mistral_and_tied_output():
    c = config({"llama.rope.freq_base": 1e6, "llama.attention.head_count_kv": 8}, has_output=False)
    assert c.rope_freq_base == 1e6 and c.n_head_kv == 8 and c.n_gqa == 4 and c.n_embd_kv == 1024
    assert c.tied_output


def test_linear_rope_scaling_and_the_old_key():
    assert config({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}).rope_freq_scale == 0.25
    assert config({"llama.rope.scale_linear": 2.0}).rope_freq_scale == 0.5
    assert config({"llama.rope.dimension_count": 64}).n_rot == 64


@pytest.mark.parametrize("extra,drop,cls,words", [
    ({"general.architecture": "gpt2"}, "", UnsupportedModelError, "architecture 'gpt2'"),
    ({}, "general.architecture", ModelFileError, "general.architecture"),
    ({}, "llama.block_count", ModelFileError, "llama.block_count"),
    ({"llama.attention.head_count_kv": 5}, "", UnsupportedModelError, "head counts"),
    ({"llama.rope.scaling.type": "yarn"}, "", UnsupportedModelError, "yarn"),
    ({"llama.rope.dimension_count": 130}, "", UnsupportedModelError, "rope dimension"),
    ({"llama.attention.value_length": 64}, "", UnsupportedModelError, "value length"),
])
def test_errors_name_the_file_and_the_problem(extra, drop, cls, words):
    with pytest.raises(cls) as info:
        config(extra, drop)
    assert str(info.value).startswith("m.gguf: ") and words in str(info.value)


@pytest.mark.parametrize("case_id", fixture_case_ids())
def test_fixture_configs_match_llama_cpp_hparams(fixtures, fixture_index, case_id):
    case = next(c for c in fixture_index["cases"] if c["id"] == case_id)
    hp = case["hparams"]
    c = open_model(fixtures / case["model"]).config
    assert c.n_layer == hp["block_count"] and c.n_embd == hp["embedding_length"]
    assert c.n_ff == hp["feed_forward_length"] and c.n_head == hp["attention.head_count"]
    assert c.n_head_kv == hp.get("attention.head_count_kv", c.n_head)
    assert c.n_rot == hp.get("rope.dimension_count", c.head_dim)
    assert c.rope_freq_base == hp.get("rope.freq_base", 10000.0)        # stories260K: absent -> 10000
    assert c.norm_eps == pytest.approx(hp["attention.layer_norm_rms_epsilon"])
    assert c.n_vocab == case["n_vocab"] and c.tied_output == (not case["has_output_weight"])
