"""(every rank of an mpiexec job) Group.allreduce_sum against the rank-order sum of known partials: rank 0
writes, per call, whether every rank got exactly the same bits and whether they equal sum(partials) in
rank order, plus the method the group chose. Used by test_tp_mpi.py."""
from __future__ import annotations

import json
import sys

import numpy as np

from core import transport
from core.transport import SHM_FLOATS

t = transport.world()
g = transport.split_group(t, 0)
shapes = [(1, 576)] * 5 + [(7, 96), (1, 576), (SHM_FLOATS // 64 + 1, 64), (3, 5), (1, 576)]   # one too big for a slot
checks = []
for i, shape in enumerate(shapes):
    rng = np.random.default_rng(1000 * i)
    partials = rng.standard_normal((t.size, *shape)).astype(np.float32)          # every rank's, known to all
    got = g.allreduce_sum(partials[t.rank].copy())
    want = partials[0] + partials[1]
    for r in range(2, t.size):
        want += partials[r]
    everyone = t.gather_obj(got.tobytes())
    if t.rank == 0:
        checks.append({"same_on_all": len(set(everyone)) == 1, "rank_order_sum": bool((got == want).all()),
                       "shape_ok": got.shape == shape})
if t.rank == 0:
    print(json.dumps({"method": g.method, "checks": checks}))
sys.stdout.flush()
t.close()
