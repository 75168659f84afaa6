"""`python -m core.tools.eval` as other tools call it: ids, --json keys, --out logits, checked against llama.cpp."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.tools.eval", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def case_of(index: dict, case_id: str) -> dict:
    return next(c for c in index["cases"] if c["id"] == case_id)


def test_json_and_out_match_llama_cpp(fixtures, fixture_index, tmp_path):
    case = case_of(fixture_index, "fx256-f32")
    out = tmp_path / "logits.npy"
    proc = run("-m", str(fixtures / case["model"]), "--tokens", ",".join(map(str, case["tokens"])),
               "--greedy", "8", "--out", str(out), "--json", "-t", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {"greedy", "top1", "load_s", "prefill_tok_s", "decode_tok_s"}
    assert result["greedy"] == case["greedy"]["tokens"][:8]
    assert result["top1"] == case["logits"]["argmax"]
    assert result["load_s"] >= 0 and result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    logits = np.load(out)
    ref = np.load(fixtures / case["logits"]["file"])
    assert logits.dtype == np.float32 and logits.shape == ref.shape
    assert np.abs(logits - ref).max() <= 1e-4


def test_plain_output_is_the_continuation_ids(fixtures, fixture_index):
    case = case_of(fixture_index, "stories260K")
    proc = run("-m", str(fixtures / case["model"]), "--tokens", ",".join(map(str, case["tokens"])),
               "--greedy", "32")
    assert proc.returncode == 0, proc.stderr
    assert [int(x) for x in proc.stdout.split()] == case["greedy"]["tokens"]


def test_usage_errors_are_one_line(fixtures):
    model = str(fixtures / "models" / "stories260K.gguf")
    for args in (["--tokens", ""], ["--tokens", "1,2", "--greedy", "-1"], ["--tokens", "1", "-t", "0"],
                 ["--tokens", "1,512"]):
        proc = run("-m", model, *args)
        assert proc.returncode == 1, args
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
