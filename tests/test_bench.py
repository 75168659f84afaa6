"""The kernel benchmark script runs and its figures are consistent with what it timed (no speed is
asserted: speed is reported by the script, not tested)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_prints_a_table_and_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "core.tools.bench", "--types", "q8_0", "--repeat", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "floors of this machine" in proc.stdout and "Q8_0" in proc.stdout
    r = json.loads(out.read_text())
    assert r["floors"]["cast_ns"] > 0 and r["floors"]["sgemm_GFLOPs"] > 0
    (row,) = r["kernels"]
    for shape, (n_out, n_in) in (("4096x4096", (4096, 4096)), ("11008x4096", (11008, 4096))):
        cell = row[shape]
        assert cell["bytes"] == n_out * n_in // 32 * 34                     # Q8_0: 34 bytes per 32 weights
        assert abs(cell["GBps"] - cell["bytes"] / (cell["ms"] / 1e3) / 1e9) < 1e-6 * cell["GBps"]
    mm = row["matmul64"]
    assert abs(mm["GFLOPs"] - 2 * 64 * 4096 * 4096 / (mm["ms"] / 1e3) / 1e9) < 1e-6 * mm["GFLOPs"]
