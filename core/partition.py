"""Layer partition: which contiguous slice of transformer blocks each pipeline rank owns.

Owns the `--mpi-layer-split` arithmetic (parse, validate, largest-remainder rounding) and nothing else:
no MPI, no model loading. Everything here is pure, so the head can validate a split before any rank
loads a byte of the model.
"""
from __future__ import annotations

import math
from typing import Sequence

from .errors import UsageError


def parse_split(text: str) -> list[float]:
    """`"0.8,0.2"` -> [0.8, 0.2]. Raises UsageError naming the bad item."""
    items = [item.strip() for item in text.split(",")]
    weights = []
    for i, item in enumerate(items):
        try:
            weights.append(float(item))
        except ValueError:
            raise UsageError(f"--mpi-layer-split: '{text}' is not a comma-separated list of numbers "
                             f"(item {i + 1} '{item}')") from None
    return weights


def check_weights(weights: Sequence[float], n_ranks: int, unit: str = "rank") -> list[float]:
    """Validate one weight per rank (per `unit`: "stage" with --tp) (finite, >= 0, not all zero); returns
    them as floats."""
    if len(weights) != n_ranks:
        raise UsageError(
            f"--mpi-layer-split has {len(weights)} weight{'s' if len(weights) != 1 else ''} "
            f"but the cluster has {n_ranks} {unit}{'s' if n_ranks != 1 else ''} (give one weight per {unit})")
    out = [float(w) for w in weights]
    for rank, w in enumerate(out):
        if not math.isfinite(w) or w < 0:
            raise UsageError(f"--mpi-layer-split: weight {w} for {unit} {rank} must be a finite number >= 0")
    if sum(out) <= 0:
        raise UsageError("--mpi-layer-split: the weights sum to zero")
    return out


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights`, summing to `total` exactly.

    Every share starts at floor(total * w / sum(w)); the units left over go to the largest fractional
    parts, ties to the lower index (so the head gets a layer before a worker does).
    """
    s = float(sum(weights))
    quotas = [total * w / s for w in weights]          # exact shares, as floats
    shares = [int(math.floor(q)) for q in quotas]
    left = total - sum(shares)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def split_layers(n_layer: int, n_ranks: int, weights: Sequence[float] | None = None,
                 unit: str = "rank") -> list[range]:
    """Contiguous layer ranges, one per rank (per pipeline stage: `unit` "stage") in order, covering
    [0, n_layer) exactly once.

    `weights` None splits equally (the remainder going to the lowest ranks). Raises UsageError when the
    weight count differs from `n_ranks` or when some rank would get no layer (naming that rank).
    """
    if n_ranks < 1:
        raise UsageError(f"the cluster needs at least one rank (got {n_ranks})")
    if n_layer < 1:
        raise UsageError(f"the model has no layers to split (n_layer {n_layer})")
    ws = [1.0] * n_ranks if weights is None else check_weights(weights, n_ranks, unit)
    shares = largest_remainder(n_layer, ws)
    for rank, share in enumerate(shares):
        if share == 0:
            how = "an equal split" if weights is None else f"--mpi-layer-split {format_split(ws)}"
            raise UsageError(
                f"{unit} {rank} would get no layer: {how} of {n_layer} layers over {n_ranks} {unit}s "
                f"(use fewer {unit}s or give {unit} {rank} a larger weight)")
    ranges, start = [], 0
    for share in shares:
        ranges.append(range(start, start + share))
        start += share
    return ranges


def format_split(weights: Sequence[float]) -> str:
    """[0.8, 0.2] -> "0.8,0.2" (as typed on a command line)."""
    return ",".join(f"{w:g}" for w in weights)


def format_layers(layers: range) -> str:
    """range(3, 7) -> "3-6" (inclusive, as users count)."""
    if len(layers) == 0:
        return "none"
    if len(layers) == 1:
        return str(layers.start)
    return f"{layers.start}-{layers.stop - 1}"
