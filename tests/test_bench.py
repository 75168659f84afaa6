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


def test_pair_figures_by_hand():
    from core.tools.paired_bench import pair_figures
    base = [[99.0, 10.0, 30.0], [50.0, 40.0, 40.0]]     # first token of each burst left out
    other = [[77.0, 10.0, 10.0], [1.0, 20.0, 20.0]]
    fig = pair_figures(base, other)
    assert fig["pairs"] == [2.0, 2.0]                   # 20/10, 40/20
    assert fig["tok_s"] == [1000.0 * 4 / 120.0, 1000.0 * 4 / 60.0]
    assert fig["ratio"] == 2.0 and fig["median_pair"] == 2.0


def test_paired_ms_by_hand():
    """Forwards of two shares paired by start time; "aligned" takes the slower forward of each pair, "synced" the
    slower share between each pair of all-reduces (us in, ms out)."""
    import math
    from core.tools.tp_bench import paired_ms
    ms = 1_000_000                                           # ns
    a = [[0, [100.0, 300.0, 100.0]], [10 * ms, [300.0, 100.0, 100.0]], [20 * ms, [200.0, 200.0, 200.0]]]
    b = [[ms // 10, [300.0, 100.0, 100.0]],                  # 0.1 ms after a[0]
         [10 * ms - ms // 5, [100.0, 100.0, 300.0]],        # 0.2 ms before a[1]
         [21 * ms, [900.0, 900.0, 900.0]]]                   # a[2]'s nearest, but 1 ms off: more than half of
    got = paired_ms(a, b)                                    # a's median forward (0.5 ms), so a[2] is unpaired
    # (a0, b0): aligned max(500, 500) us, synced 300 + 300 + 100; (a1, b1): 500 and 300 + 100 + 300
    assert got == {"aligned": 0.5, "synced": 0.7}
    assert all(math.isnan(v) for v in paired_ms(a[2:], b[2:]).values())
    assert all(math.isnan(v) for v in paired_ms([], b).values())


def test_paired_bench_takes_turns_between_one_process_and_tp2(tmp_path):
    """Both jobs run to the end (neither waits forever for its turn), each decodes every burst, and the
    printed figures are those of the bursts it timed."""
    from core.tools.paired_bench import pair_figures
    from core.tools.synth import write_synthetic
    model = tmp_path / "tiny.gguf"
    write_synthetic(model, "tiny", "q4_0")
    proc = subprocess.run([sys.executable, "-m", "core.tools.paired_bench", "--model", str(model), "--prompt", "8",
                           "--bursts", "3", "--burst", "4", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["ranks"] == [1, 2]
    assert [len(b) for job in r["ms"] for b in job] == [4] * 6
    assert r == r | pair_figures(*r["ms"])
    assert len(r["pairs"]) == 3 and r["ratio"] > 0
