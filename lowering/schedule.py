"""The causal block schedule: which dyadic levels run MuSe and which run exact attention.

Causal attention over N tokens splits into exact local blocks of ``block_size`` (causal mask inside) plus
levels ℓ = 0, 1, … with segment size S = block_size·2^ℓ < N: at each level, the queries of every right
segment [(2p+1)S, (2p+2)S) attend the keys of the left segment [2pS, (2p+1)S). Every (query, key) pair with
key < query lies in exactly one local block or one level pair. A level whose segments are short runs exact
attention: clustering S keys into C clusters saves nothing when S is not several times C, and with
S <= C the clustering would be the identity anyway (so ``clusters >= N`` gives exact attention).
"""
from __future__ import annotations

import dataclasses
from typing import List

__all__ = ["Level", "causal_schedule", "EXACT_LEVEL_FACTOR"]

# A level runs exact attention while its segment is shorter than this many times the cluster count.
# A MuSe level of P pairs makes P·C² summaries; its fixed per-cluster costs (centroids, directions, summary
# writes) beat exact attention over the pair only once S is well above C. Measured on the H100 (Triton path,
# bf16, causal 16k, C=64, 2026-11-22): factor 4 spent 11 ms in stage 1 of the S=256..1024 levels; factor 32
# (exact up to S=1024, MuSe from 2048) took 2.82 ms from a CUDA graph; factor 64 (MuSe from 4096) 2.05 ms.
EXACT_LEVEL_FACTOR = 64


@dataclasses.dataclass(frozen=True)
class Level:
    segment: int      # S: length of each left (key) and right (query) segment
    exact: bool       # exact attention instead of MuSe for this level
    full_pairs: int   # pairs whose right segment is complete
    tail: int         # length of a trailing incomplete right segment (0 = none)


def causal_schedule(n: int, block_size: int, clusters: int) -> List[Level]:
    """The levels of causal attention over ``n`` tokens (local blocks are implied by ``block_size``)."""
    levels = []
    s = block_size
    while s < n:
        full = n // (2 * s)
        rem = n - full * 2 * s
        tail = rem - s if rem > s else 0
        levels.append(Level(segment=s, exact=s < EXACT_LEVEL_FACTOR * clusters, full_pairs=full, tail=tail))
        s *= 2
    return levels
