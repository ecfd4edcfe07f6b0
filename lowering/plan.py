"""From (shapes, dtypes, GQA ratio, causal, policy numbers) to a kernel plan for the Triton MuSe forward.

``plan(...)`` is pure (no tensors, no device): it picks the generated-kernel spec, block sizes, the causal
level schedule (exact chunk + MuSe levels) and the workspace sizes. ``supports(q, k, v, ...)`` says whether
the Triton path takes a call, and why not. ``generated_source(plan)`` returns the specialised Triton source.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import List, Optional, Tuple

import torch

from muse_compile.lowering.codegen import KernelSpec, _pow2, load, render
from muse_compile.lowering.schedule import causal_schedule

__all__ = ["KernelPlan", "LevelPlan", "StateLayout", "level_state_parts", "plan", "supports", "generated_source",
           "describe", "gpu_limits", "MAX_CLUSTERS", "MAX_CLUSTERS_GPU", "MAX_HEAD_DIM", "GUARD_SAMPLES", "POWER_ITERS"]

MAX_CLUSTERS = 256          # clusters per set the kernels hold in registers (interpreter)
# On the GPU: at 256 (padded) clusters the k-means pass needs 320 KiB of shared memory (measured on the H100,
# 2026-11-22: OutOfResources, limit 227 KiB) and stage 2 holds three [256, D] fp32 tiles; 128 ran (32k, C=128).
MAX_CLUSTERS_GPU = 128
MAX_HEAD_DIM = 256
from muse_compile.kernels.reference import GUARD_SAMPLES, POWER_ITERS  # noqa: E402  (same constants)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class LevelPlan:
    """One acausal MuSe problem batch: P pairs of (fit/key segment, answer segment)."""
    segment: int          # length of fit and key sets (S; N for the query side of the acausal op)
    pairs: int            # P
    fit_len: int          # query-fit set length
    key_len: int          # key set length
    ans_len: int          # max answer set length
    q_clusters: int       # Cq = min(query_clusters, fit_len)
    k_clusters: int       # Ck = min(key_clusters, key_len)
    pair_stride: int      # 2S for causal levels, 0 for the acausal op
    ans_off: int          # S for causal levels (right segments), 0 acausal
    same: bool            # answer set == fit set (acausal)


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    spec: KernelSpec
    batch: int
    heads: int
    kv_heads: int
    n: int
    m: int
    causal: bool
    kmeans_iters: int
    has_mask: bool
    exact_chunk: int                  # causal: exact attention inside aligned chunks of this many tokens
    levels: Tuple[LevelPlan, ...]     # MuSe problem batches (1 for acausal)
    bn_kmeans: int
    bn_stage1: int
    ba_stage1: int
    bm_stage2: int
    bm_exact: int
    bn_exact: int
    warps: int
    warps_kmeans: int
    warps_stage: int
    workspace_bytes: int              # forward-only scratch (the state kept for the backward: state_bytes)
    stages_kmeans: int = 0            # software-pipelining stages (0: Triton's default)
    stages_stage: int = 0
    jb_stage1: int = 1                # key clusters per stage-1 program (4 was slower than 1 on the H100)
    pos_atomic: bool = True           # k-means positions by per-token atomics (order inside a cluster varies
    #                                   between runs); False: per-program ranks by a cumulative sum (slower)
    kmeans_programs: int = 264        # k-means programs per final pass to aim for (tiles per program follow)
    kmeans_tiles: int = 0             # tiles per final-pass program instead (0: from kmeans_programs)
    # the fit passes (a strided subset, with the member sums) by their own tile, warps, program target and
    # most tiles per program (0: as the final passes)
    bn_kmeans_fit: int = 0
    warps_kmeans_fit: int = 0
    kmeans_fit_programs: int = 0
    kmeans_fit_max_tiles: int = 16
    warps_stage2: int = 0             # 0: warps_stage
    warps_exact: int = 0              # 0: warps
    power_dot: bool = False           # centroid_dir's power iteration by tensor-core products (else reductions;
    #                                   at D = 64 both take 0.06 ms at 8k, at D = 128 0.30 vs 0.44 ms)
    warps_centroid: int = 2           # centroid_dir at 8k, C = 64 (H100): 2 warps 0.050 ms, 4 warps 0.074, 8 0.099
    warps_guard: int = 0              # 0: warps
    bn_centroid: int = 0              # centroid_dir's member tile (0: min(bn_stage1, 64)); 32 made it slower (0.062
    #                                   -> 0.082 ms at 8k, H100), while stage 1 may want 32
    # tokens per scatter_perm program (the cluster starts by a register gather): 256 at 8k / 32k / causal 16k
    # (mixture, H100, 2026-11-23): scatter 0.0105 / 0.036 / 0.035 ms, against 0.010 / 0.056 / 0.040 with 1024
    # and 0.023 / 0.083-0.103 / 0.072 for the former 128-token [BN, C] comparison
    bn_scatter: int = 256
    size_order: bool = True           # per-cluster programs take their clusters largest first (scatter_perm's
    #                                   order; False: in index order)
    overlap: bool = True              # key side / exact part on side streams, concurrent with the query side
    maxnreg_stage1: int = 0           # register caps (0: none); a cap that makes ptxas spill was slower (v15)
    maxnreg_stage2: int = 0
    # backward tiles. Shared memory on sm_90 (benchmarks/kernel_resources.py, triton 3.6 as on the device
    # machine, launches as specialised at run time): with 16-bit products stage1_bwd (64 centroids / 64 keys,
    # 4 warps) needs 112 KiB at D = 64, 256 KiB at D = 128 with 64 keys on 8 warps (so 32 keys there: 120
    # KiB), stage2_bwd 65 KiB at D = 64 and 177 KiB at D = 128 with 128 clusters, the exact kernels 73 / 64
    # KiB at D = 64; with float32 (tf32x3) products at D = 64 stage1_bwd (32/32) 144 KiB, stage2_bwd 176 KiB
    # and the exact kernels 193 / 160 KiB.
    ba_stage1_bwd: int = 64           # all of A = G·Cq in one block where it fits: dk, dv without atomics
    bn_stage1_bwd: int = 32
    bm_exact_bwd: int = 64
    bn_exact_bwd: int = 64
    # 32-row / 32-key tiles: stage2_bwd spills 120 B per thread instead of 840 with 64 rows, stage1_bwd 280 B
    # instead of 840 with 64 keys; at 8k, D = 64, C = 64 (H100, 2026-11-22): stage2_bwd 0.292 -> 0.242 ms,
    # stage1_bwd 0.434 -> 0.418 (causal 16k: 0.670 -> 0.478, 1.036 -> 0.927); at D = 128 stage2_bwd
    # 0.885 -> 0.683 ms at 8k, 2.01 -> 0.98 at causal 16k. float32 products need 32 rows anyway (64: 177 KiB)
    bm_stage2_bwd: int = 32
    warps_bwd: int = 4                # 4 vs 8 warps at 8k, C = 64: stage1_bwd 0.48 vs 0.69 ms, stage2_bwd 0.42 vs 0.47
    # stage1_bwd takes the tilted moments from the forward's stored summaries instead of a first pass over the
    # keys: 8k 0.275 -> 0.240 ms, causal 16k 0.635 -> 0.557 (H100, bf16, C = 64, 2026-11-23); bf16 gradient
    # errors against the reference unchanged to 2 digits (tests/test_triton_gpu.py)
    bwd_stored_moments: bool = True
    bwd_16bit_accumulators: bool = True   # 16-bit path: dq, dk, dv accumulate in the input dtype (no float32
    #                                       copies and casts); float32 where dk/dv need float atomics

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def backward_fits(self) -> bool:
        """Whether the backward kernels' tiles fit an sm_90 SM's shared memory (227 KiB). stage2_bwd holds
        one query cluster's CK summaries, so its need grows with CK × head dim. Measured with
        benchmarks/kernel_resources.py (triton 3.6, the device machine's; every supported shape in its --grid
        fits): 16-bit products need 177 KiB for stage2_bwd at D = 128, C = 128; float32 products (tf32x3) 176
        KiB at D = 64, C = 64 and overflow above. The interpreter has no such limit."""
        if self.spec.precision == "ieee":
            return True
        width = max(self.spec.bd, self.spec.bdv)
        ck = max(_pow2(lv.k_clusters) for lv in self.levels) if self.levels else 0
        if self.spec.native:
            return width <= 128 and ck * width <= 128 * 128
        return width <= 64 and ck <= 64

    @property
    def summary_dtype(self) -> torch.dtype:
        """Storage of the summaries k̃, ṽ, g: the 16-bit input dtype on the native path, else float32."""
        return getattr(torch, self.spec.dot_dtype) if self.spec.native else torch.float32

    def state_layout(self) -> StateLayout:
        """The layout of the forward's state (see :class:`StateLayout`); a pure function of the plan."""
        return _state_layout(self)

    @property
    def state_bytes(self) -> int:
        return self.state_layout().nbytes

    def kernels(self) -> List[str]:
        """Kernel launches in order (names of the generated functions)."""
        out = []
        if self.causal:
            out.append("exact_causal")
        for lv in self.levels:
            out += ["kmeans_pass"] * (2 * (self.kmeans_iters + 1))
            out += ["scatter_perm", "scatter_perm", "centroid_dir"]
            if not lv.same:
                out += ["kmeans_pass", "scatter_perm"]
            out.append("stage1")
            if self.spec.dipole:
                out += ["guard_exact", "guard"]
            out.append("stage2")
        return out


def guard_chunks(sets: int, sample_blocks: int, key_len: int, interpret: bool) -> int:
    """Key chunks of the guard samples' exact attention: enough programs to fill the GPU, >= 1024 keys each."""
    if interpret:
        return 2
    return max(1, min(-(-264 // (sets * sample_blocks)), -(-key_len // 1024)))


def guard_sample_block(interpret: bool) -> int:
    return 32 if interpret else 64


def level_state_parts(lv: LevelPlan, Z: int, G: int, bd: int, bdv: int, dipole: bool):
    """What the backward needs of one MuSe problem batch, as ``(zero-initialised parts, other parts)``, each a
    list of ``(name, elements, kind)`` with kind ``"f32"``, ``"i32"`` or ``"sum"`` (the summaries' storage:
    the input's 16-bit dtype on the native path, else float32). ``qcnt``/``kcnt`` are the final k-means
    counts, ``aperm``/``acnt`` the answer set's sort order and counts (the fit set's when they coincide),
    ``qord``/``kord``/``aord`` each set's clusters by size (largest first; the per-cluster kernels' order)."""
    P = lv.pairs
    nsq, nsk = Z * P * G, Z * P
    cq, ck = lv.q_clusters, lv.k_clusters
    n_sum = nsk * G * cq * ck
    zero = [("qcnt", nsq * cq, "i32"), ("kcnt", nsk * ck, "i32")]
    if not lv.same:
        zero.append(("acnt", nsq * cq, "i32"))
    if dipole:
        zero.append(("lam", 2 * nsq, "f32"))
    rest = [("qassign", nsq * lv.fit_len, "i32"), ("aperm", nsq * lv.ans_len, "i32"),
            ("kperm", nsk * lv.key_len, "i32"), ("qord", nsq * cq, "i32"), ("kord", nsk * ck, "i32"),
            ("kmu", nsk * ck * bd, "f32"), ("qbar", nsq * cq * bd, "f32"),
            ("beta", n_sum, "f32"), ("kt", n_sum * bd, "sum"), ("vt", n_sum * bdv, "sum")]
    if not lv.same:
        rest.append(("aord", nsq * cq, "i32"))
    if dipole:
        rest += [("u", nsq * cq * bd, "f32"), ("sig", n_sum, "f32"), ("gs", n_sum * bdv, "sum")]
    return zero, rest


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where the forward's state lives in one byte buffer (the op's second output, saved for the backward):
    ``lse`` (float32 ``[B, H, N]``) and per MuSe problem batch the parts of :func:`level_state_parts`, each
    ``name -> (byte offset, elements, kind)``. The first ``zero_bytes`` bytes must start at zero (counts and
    λ sums are accumulated by atomics)."""
    nbytes: int
    zero_bytes: int
    lse: Tuple[int, int]
    levels: Tuple[dict, ...]


_ALIGN = 64   # bytes: every part starts at a multiple (16 float32 / int32, 32 16-bit elements)


def _level_scratch(lv: LevelPlan, Z: int, G: int, iters: int, bd: int, bdv: int, dipole: bool,
                   interpret: bool) -> int:
    """Bytes of one problem batch's forward-only workspace (k-means passes, positions, guard partials)."""
    P = lv.pairs
    nsq, nsk = Z * P * G, Z * P
    f4 = 4
    sets = nsq * lv.q_clusters + nsk * lv.k_clusters
    b = sets * ((iters + 1) * bd + iters * (bd + 1)) * f4     # centroids of every pass, sums and counts of the fits
    if not dipole:
        b += nsq * lv.q_clusters * bd * f4                     # the query side's final member sums
    b += nsq * lv.fit_len * 2 * f4 + nsk * lv.key_len * 2 * f4             # pos, perm / assign
    if not lv.same:
        b += nsq * lv.ans_len * 2 * f4
    if dipole:
        ns = min(lv.fit_len, GUARD_SAMPLES)
        ks = guard_chunks(nsk, -(-G * ns // guard_sample_block(interpret)), lv.key_len, interpret)
        b += nsk * G * ns * ks * (bdv + 1) * f4
    return b


@functools.lru_cache(maxsize=256)
def _state_layout(p: "KernelPlan") -> StateLayout:
    size = {"f32": 4, "i32": 4, "sum": p.summary_dtype.itemsize}
    Z, G = p.batch * p.kv_heads, p.groups
    parts = [level_state_parts(lv, Z, G, p.spec.bd, p.spec.bdv, p.spec.dipole) for lv in p.levels]
    off = 0
    levels = [dict() for _ in parts]

    def place(d, name, n, kind):
        nonlocal off
        d[name] = (off, n, kind)
        off += -(-n * size[kind] // _ALIGN) * _ALIGN

    for d, (zero, _) in zip(levels, parts):
        for part in zero:
            place(d, *part)
    zero_bytes = off
    n_lse = p.batch * p.heads * p.n
    lse = (off, n_lse)
    off += -(-n_lse * 4 // _ALIGN) * _ALIGN
    for d, (_, rest) in zip(levels, parts):
        for part in rest:
            place(d, *part)
    return StateLayout(nbytes=off, zero_bytes=zero_bytes, lse=lse, levels=tuple(levels))


def plan(*, batch: int, heads: int, kv_heads: int, n: int, m: int, head_dim: int, value_dim: int,
         dtype: torch.dtype, causal: bool, clusters: int = 128, query_clusters: Optional[int] = None,
         dipole: bool = True, kmeans_iters: int = 2, block_size: int = 256, has_mask: bool = False,
         interpret: Optional[bool] = None, native_16bit_in_interpreter: bool = False) -> KernelPlan:
    """The kernel plan of one call shape (pure function of its arguments)."""
    return _plan(batch, heads, kv_heads, n, m, head_dim, value_dim, dtype, bool(causal), int(clusters),
                 None if query_clusters is None else int(query_clusters), bool(dipole), int(kmeans_iters),
                 int(block_size), bool(has_mask), _interpreting() if interpret is None else bool(interpret),
                 bool(native_16bit_in_interpreter))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=256)
def _plan(B, H, Hkv, N, M, D, Dv, dtype, causal, clusters, query_clusters, dipole, iters, block_size,
          has_mask, interpret, native_16bit_in_interpreter) -> KernelPlan:
    G = H // Hkv
    Z = B * Hkv
    qc = clusters if query_clusters is None else query_clusters
    # float32 on the GPU: "tf32x3" (three tf32 tensor-core products, float32-level accuracy). "ieee" (FMA dot
    # loops) took 150 s to compile one k-means variant at 64 clusters and longer at 128-256 (measured), which
    # stalled the GPU tests; the interpreter keeps "ieee".
    prec = "ieee" if interpret else ("tf32x3" if dtype == torch.float32 else "tf32")
    # 16-bit inputs on the GPU: dot operands stay 16-bit (flash-style; half the shared memory and registers of
    # the float32 tiles, full tensor-core rate). The interpreter computes in float32 unless a test asks.
    dot_dtype = "float32"
    if dtype in (torch.float16, torch.bfloat16) and (not interpret or native_16bit_in_interpreter):
        dot_dtype = "bfloat16" if dtype == torch.bfloat16 else "float16"
    spec = KernelSpec(head_dim=D, value_dim=Dv, precision=prec, dipole=dipole, dot_dtype=dot_dtype)
    levels: List[LevelPlan] = []
    exact_chunk = 0
    if not causal:
        levels.append(LevelPlan(segment=N, pairs=1, fit_len=N, key_len=M, ans_len=N,
                                q_clusters=min(qc, N), k_clusters=min(clusters, M), pair_stride=0, ans_off=0,
                                same=True))
    else:
        sched = causal_schedule(N, block_size, max(qc, clusters))
        n_exact = 0
        while n_exact < len(sched) and sched[n_exact].exact:
            n_exact += 1
        if any(lv.exact for lv in sched[n_exact:]):
            raise AssertionError("exact levels must be the lowest ones")
        exact_chunk = block_size << n_exact
        for lv in sched:
            if lv.exact:
                continue
            S = lv.segment
            P = lv.full_pairs + (1 if lv.tail else 0)
            levels.append(LevelPlan(segment=S, pairs=P, fit_len=S, key_len=S, ans_len=S,
                                    q_clusters=min(qc, S), k_clusters=min(clusters, S), pair_stride=2 * S,
                                    ans_off=S, same=False))
    bd, bdv = spec.bd, spec.bdv
    width = max(bd, bdv)
    big = width >= 128
    ws = sum(_level_scratch(lv, Z, G, iters, bd, bdv, dipole, interpret) for lv in levels)
    if causal and levels:
        ws += B * H * N * Dv * (2 if spec.native else 4)   # the accumulator the parts merge into
    ck = max((_pow2(lv.k_clusters) for lv in levels), default=16)
    wc, pdot, ws2, mr2, bnc, wg = 2, False, 0, 0, 0, 0
    kfit = {}
    if interpret:
        bnk, bn1, ba1, bm2, bme, bne, warps, wk, wst = 32, 32, 32, 32, 32, 32, 4, 4, 4
    elif spec.native or not big:
        # Shared memory and spills of every launch: benchmarks/kernel_resources.py --grid (sm_90, triton 3.6)
        # 128-token k-means tiles at width 128 too: 0.33 -> 0.23 ms at 8k, D = 128 (H100, 2026-11-22)
        bnk = 128 if width <= 128 else 64
        # stage 1 on 32-key tiles at width <= 64 (245 registers, no spills; 64 keys: 255 and 144 B of stack):
        # 0.109 -> 0.104 ms at 8k, 0.263 -> 0.240 at causal 16k (H100, 2026-11-23); centroid_dir keeps 64-member
        # tiles (32: 0.062 -> 0.082 ms)
        bn1, bnc = (32, 64) if spec.native and width <= 64 else (64, 0)
        ba1 = 64
        # stage 2 holds a query cluster's CK summaries: at width 256 and 128 clusters the merging (causal)
        # variant needs 256 KiB with 64-row tiles, 208 KiB with 32
        bm2 = 32 if width * ck > 128 * 128 else 64
        # the exact causal kernel at width 128: 128-row tiles on 8 warps 1.46 ms at causal 16k against 2.77 with
        # 64 rows (H100, 2026-11-22); at width 256 128 rows need 256 KiB
        bme, bne = (128, 64) if width <= 128 else (64, 64)
        # 8 warps for k-means: 0.251 vs 0.296 ms at 8k, C=64, bf16 (H100, 2026-11-22)
        warps, wk, wst = 4, 8, 4
        if spec.native and width <= 64:
            # one pass alone, repeated in a graph (H100, 2026-11-23; 32 sets of 8k / 16k / 32k tokens, 64 of
            # 4k): 4 warps throughout; final passes on 8 tiles of 64 tokens per program, 22.9 / 50.9 / 89.3 /
            # 20.9 us (8 warps and 264+ programs: 25.3 / 51.5 / 92.7 / 23.4); fit passes on 128-token tiles,
            # >= 256 programs and <= 4 tiles, 10.7 / 15.3 / 30.5 / 10.7 (before: 14.5 / 27.9 / 46.7 / 14.7)
            bnk, wk = 64, 4
            kfit = dict(kmeans_tiles=8, bn_kmeans_fit=128, warps_kmeans_fit=4, kmeans_fit_programs=256,
                        kmeans_fit_max_tiles=4)
        # stage 2 at width <= 64 with <= 64 key clusters fits 168 registers without spilling (188 uncapped):
        # 3 blocks per SM instead of 2, 0.090 -> 0.076 ms at 8k, 0.250 -> 0.211 at causal 16k (H100,
        # 2026-11-22). With 128 clusters, or float32 tiles, the cap spills 0.5-1.1 KiB per thread
        mr2 = 168 if spec.native and width <= 64 and ck <= 64 else 0
        # the guard (one sample per program) on 2 warps at width <= 64 with <= 64 key clusters (119 registers):
        # 0.026 -> 0.023 ms at 8k, 0.074 -> 0.068 at causal 16k (H100, 2026-11-23; 1 warp spills elsewhere)
        wg = 2 if width <= 64 and ck <= 64 else 0
        if big:
            # at width 128 the 4-warp stage 1 spills 3.2 KiB per thread, centroid_dir on 2 warps 9.4 KiB (its
            # [D, D] scatter matrix; 4.98 ms at 8k, D = 128, H100). centroid_dir with the power iteration as
            # tensor-core products: 0.30 ms on 4 warps, 0.40 on 8 (the reductions on 8 warps: 0.44)
            # (at width 256 4 warps spill 4 KiB per thread: 8)
            warps, wst, wc, pdot = 8, 8, 4 if width <= 128 else 8, True
            # stage 2 on 4 warps at width 128: 0.186 vs 0.221 ms at 8k (stage 1 wants 8: 0.310 vs 0.418)
            ws2 = 4 if width <= 128 else 0
    else:
        # float32 (tf32x3 products) at width 128: 32-row tiles, e.g. stage 1 96 KiB (320 with 64), stage 2
        # 224 KiB at 64 clusters (supports() refuses more clusters), the exact kernel 104 KiB
        bnk = bn1 = ba1 = bm2 = bme = bne = 32
        warps, wk, wst, wc, pdot = 8, 8, 8, 8, True
    return KernelPlan(spec=spec, batch=B, heads=H, kv_heads=Hkv, n=N, m=M, causal=causal, kmeans_iters=iters,
                      has_mask=has_mask, exact_chunk=exact_chunk, levels=tuple(levels), bn_kmeans=bnk,
                      bn_stage1=bn1, ba_stage1=ba1, bm_stage2=bm2, bm_exact=bme, bn_exact=bne, warps=warps, warps_kmeans=wk, warps_stage=wst,
                      warps_centroid=wc, warps_guard=wg, bn_centroid=bnc, power_dot=pdot, warps_stage2=ws2, maxnreg_stage2=mr2, workspace_bytes=ws,
                      jb_stage1=2 if interpret else 1, bn_scatter=32 if interpret else 256,
                      bm_exact_bwd=32 if interpret or big else 64, bn_exact_bwd=32 if interpret else 64,
                      warps_bwd=8 if big else 4,
                      ba_stage1_bwd=32 if interpret or not spec.native else 64, bn_stage1_bwd=32,
                      **kfit)


def supports(q, k, v, *, causal: bool = False, key_padding_mask=None, clusters: int = 128,
             query_clusters: Optional[int] = None, **kw) -> Tuple[bool, str]:
    """Whether the Triton path takes this call; ``(False, reason)`` names the first obstacle."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return False, f"triton is not importable ({type(e).__name__})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return False, f"{name} must be a 4-D tensor"
    if not q.is_cuda and not _interpreting():
        return False, f"tensors are on {q.device}, the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype} is not supported by the Triton kernels (float16, bfloat16, float32)"
    if not (q.dtype == k.dtype == v.dtype):
        return False, "q, k, v dtypes differ"
    N, M = q.shape[2], k.shape[2]
    why = gpu_limits(q.dtype, N, M, q.shape[-1], v.shape[-1], clusters, query_clusters, interpret=_interpreting())
    if why:
        return False, why
    if q.shape[1] % k.shape[1] != 0:
        return False, "query heads are not a multiple of key/value heads"
    if causal and N != M:
        return False, "causal attention needs N == M"
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (q.shape[0], M)):
        return False, "key_padding_mask must be bool [B, M]"
    return True, ""


def gpu_limits(dtype, N: int, M: int, D: int, Dv: int, clusters: int, query_clusters: Optional[int] = None, *,
               interpret: bool = False) -> str:
    """The first size limit of the kernels a call exceeds ("" if none): head dims, clusters per set, and the
    shared memory the float32 tiles need on sm_90 (227 KiB a block; every launch of the supported shapes
    compiled ahead of time with benchmarks/kernel_resources.py --grid). The interpreter has no shared memory
    limit."""
    qc = clusters if query_clusters is None else query_clusters
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        return f"head dims {D}/{Dv} exceed {MAX_HEAD_DIM}"
    cap = MAX_CLUSTERS if interpret else MAX_CLUSTERS_GPU
    if min(qc, N) > cap or min(clusters, M) > cap:
        return f"more than {cap} clusters per set (clusters={clusters}, query_clusters={qc})"
    width = max(_pow2(D), _pow2(Dv))
    if dtype == torch.float32 and not interpret and width > 64:
        # float32 tiles take twice the shared memory of 16-bit ones
        if width > 128:
            return (f"float32 with head dims {D}/{Dv}: the kernels' float32 tiles exceed the GPU's shared "
                    f"memory above 128 (use bfloat16/float16, e.g. autocast)")
        if _pow2(min(qc, N)) > 64 or _pow2(min(clusters, M)) > 64:
            return (f"float32 with head dims {D}/{Dv} and more than 64 clusters: stage 2's float32 summary "
                    f"tiles exceed the GPU's shared memory (use bfloat16/float16 or <= 64 clusters)")
    return ""


def generated_source(p: KernelPlan) -> str:
    """The specialised Triton source the plan runs."""
    return render(p.spec)


def describe(p: KernelPlan) -> str:
    """A short human-readable summary of a plan."""
    lines = [f"MuSe Triton plan: B={p.batch} H={p.heads} Hkv={p.kv_heads} N={p.n} M={p.m} "
             f"D={p.spec.head_dim} Dv={p.spec.value_dim} causal={p.causal} dipole={p.spec.dipole} "
             f"precision={p.spec.precision} dots={p.spec.dot_dtype} kmeans_iters={p.kmeans_iters} mask={p.has_mask}"]
    if p.causal:
        lines.append(f"  exact causal chunk: {p.exact_chunk}")
    for lv in p.levels:
        lines.append(f"  MuSe problem batch: segment={lv.segment} pairs={lv.pairs} Cq={lv.q_clusters} "
                     f"Ck={lv.k_clusters}")
    lines.append(f"  launches: {len(p.kernels())}; state kept for the backward {p.state_bytes / 2**20:.1f} MiB, "
                 f"forward-only workspace ≈ {p.workspace_bytes / 2**20:.1f} MiB")
    return "\n".join(lines)


def module_for(p: KernelPlan):
    """The loaded generated module of a plan."""
    return load(p.spec)
