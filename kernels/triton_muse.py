"""The MuSe forward on generated Triton kernels: same function as ``kernels/reference.py``.

``muse_attention(q, k, v, ...)`` -> ``(out [B, H, N, Dv] in q.dtype, lse [B, H, N] float32)`` (and the state the
backward reads with ``return_state=True``); ``muse_attention_backward`` -> ``(dq, dk, dv)``.

Per acausal problem batch (the whole acausal op, or one dyadic level of the causal op with all its pairs,
all batch·heads in each launch): k-means passes for queries and keys (fused distance GEMM + argmin + atomic
per-cluster sums/counts, one launch per Lloyd step), counting-sort scatter of each set by cluster (which also
records the set's clusters by size: every per-cluster kernel takes its clusters largest first), query
centroids + dipole directions, stage 1 (tilted summaries), the guard samples' exact attention (token
order, key set in chunks), guard (λ per head), stage 2 (summary attention + dipole, written in place or LSE-merged). The causal op
runs exact causal attention inside aligned chunks (local blocks + the exact levels; torch's cuDNN / flash SDPA
forward where it applies, else ``exact_causal``) on a side stream while its MuSe levels cluster, each level on
its own streams, then LSE-merges the levels' stage 2 into that output in order.
No host synchronisation: every shape is known from the plan; the workspaces have their maximum sizes.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple

import torch

from muse_compile.lowering.plan import (GUARD_SAMPLES, POWER_ITERS, KernelPlan, guard_chunks, guard_sample_block,
                                        module_for, plan, supports)
from muse_compile.kernels.reference import kmeans_fit_stride

__all__ = ["muse_attention", "make_plan"]

ALL_PHASES = frozenset({"local", "cluster", "stage1", "stage2", "cast"})
_DEBUG = None
log = logging.getLogger(__name__)
TUNE: dict = {}   # plan field overrides for tuning runs (e.g. {"warps_stage": 4}); empty in normal use
# TUNE keys that are no plan fields: "fit_stride" (force the k-means fit stride; timing only, the result then
# differs from the reference)
# "native_16bit_in_interpreter" (run the GPU's 16-bit dot path in the interpreter; tests)
# "exact_sdpa" (False: the causal op's exact part on the op's own exact_causal kernel instead of cuDNN/flash)
# "level_streams" (False: the causal op's levels one after another on the caller's stream; timing only)
# "row_dot_side" (False: the causal backward's D = dO·o before the exact part's backward, not beside it)
_TUNE_EXTRA = ("fit_stride", "native_16bit_in_interpreter", "exact_sdpa", "level_streams", "row_dot_side")


def make_plan(q, k, v, *, causal=False, clusters=128, query_clusters=None, dipole=True, kmeans_iters=2,
              block_size=256, key_padding_mask=None) -> KernelPlan:
    B, H, N, D = q.shape
    return plan(batch=B, heads=H, kv_heads=k.shape[1], n=N, m=k.shape[2], head_dim=D, value_dim=v.shape[-1],
                dtype=q.dtype, causal=causal, clusters=clusters, query_clusters=query_clusters, dipole=dipole,
                kmeans_iters=kmeans_iters, block_size=block_size, has_mask=key_padding_mask is not None,
                native_16bit_in_interpreter=bool(TUNE.get("native_16bit_in_interpreter", False)))


def muse_attention(q, k, v, *, causal=False, scale=None, clusters=128, query_clusters=None, dipole=True,
                   kmeans_iters=2, block_size=256, key_padding_mask=None, return_state=False,
                   _phases=ALL_PHASES):
    """MuSe forward on the Triton kernels; arguments and returns as ``reference.muse_attention``.

    ``return_state=True`` returns ``(out, lse, state)``: ``state`` is one uint8 tensor of
    ``plan.state_bytes`` bytes holding what the backward needs (log-sum-exp, and per MuSe problem batch the
    assignments, sort orders, counts, tilt points, directions, λ and summaries; layout
    ``KernelPlan.state_layout``). ``muse_attention_backward(..., saved=(out, state))`` then runs without
    re-running the forward, on exactly this call's clustering."""
    ok, why = supports(q, k, v, causal=causal, key_padding_mask=key_padding_mask, clusters=clusters,
                       query_clusters=query_clusters)
    if not ok:
        raise ValueError(f"the Triton MuSe path does not take this call: {why}")
    if kmeans_iters < 0 or clusters < 1 or block_size < 1 or (query_clusters is not None and query_clusters < 1):
        raise ValueError("clusters, query_clusters, block_size must be >= 1 and kmeans_iters >= 0")
    if torch.are_deterministic_algorithms_enabled():
        _alert_not_deterministic()
    pl = _tuned(make_plan(q, k, v, causal=causal, clusters=clusters, query_clusters=query_clusters, dipole=dipole,
                          kmeans_iters=kmeans_iters, block_size=block_size, key_padding_mask=key_padding_mask))
    mod = module_for(pl)
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    Z = B * Hkv
    s = D ** -0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    valid = None
    if key_padding_mask is not None:
        valid = key_padding_mask.contiguous().view(torch.uint8)
    dev = q.device
    lay = pl.state_layout()
    state = torch.empty(lay.nbytes, device=dev, dtype=torch.uint8)
    if lay.zero_bytes:
        state[:lay.zero_bytes].zero_()
    lse, kept = state_views(pl, state)

    def done(out):
        return (out, lse, state) if return_state else (out, lse)

    if not causal:
        out = torch.empty(B, H, N, Dv, device=dev, dtype=q.dtype)
        _level(mod, pl, pl.levels[0], kept[0], q, k, v, valid, s, Z, G, Hkv, N, M, out, lse, merge=False,
               phases=_phases)
        return done(out)
    direct = len(pl.levels) == 0
    # the levels LSE-merge into this accumulator in place. On the 16-bit path it has the input's dtype: the
    # exact part then comes straight from cuDNN, and the merges and the final cast move half the bytes
    # (each merge rounds once more to 16 bits, well inside the op's bf16 tolerance)
    acc_dtype = q.dtype if direct or pl.spec.native else torch.float32
    # the exact part (local blocks + exact levels) runs on a second side stream while the MuSe levels
    # cluster; the first level's stage 2, which merges into its output, waits for it
    ex = _side_stream(dev, 1) if pl.overlap else None
    ev = None
    acc = None
    if "local" in _phases:
        with _fork(ex):
            if acc_dtype == q.dtype and TUNE.get("exact_sdpa", True):
                acc = _exact_forward_sdpa(q, k, v, s, pl.exact_chunk, valid, lse)
            if acc is None:
                acc = torch.empty(B, H, N, Dv, device=dev, dtype=acc_dtype)
                BM, BN = pl.bm_exact, pl.bn_exact
                mod.exact_causal[(B * H, triton_cdiv(N, BM))](
                    q, k, v, s, valid if valid is not None else q, acc, lse, G, Hkv, N, pl.exact_chunk,
                    BM=BM, BN=BN, HAS_VALID=valid is not None, num_warps=pl.warps_exact or pl.warps)
            if ex is not None:
                ev = torch.cuda.Event()
                ev.record(ex)
    else:
        acc = torch.empty(B, H, N, Dv, device=dev, dtype=acc_dtype)
    # the levels are independent up to their stage 2, which LSE-merges into acc (rows of different levels
    # overlap): each level clusters and runs stage 1 on its own pair of side streams, all at once, since
    # every one of those kernels is latency-bound at low occupancy; the merges then run in order on the
    # caller's stream, the first after the exact part
    apart = pl.overlap and TUNE.get("level_streams", True)
    merges = []
    for i, lv in enumerate(pl.levels):
        ls = _side_stream(dev, 2 + 2 * i) if apart else None
        with _fork(ls):
            fin = _level(mod, pl, lv, kept[i], q, k, v, valid, s, Z, G, Hkv, N, N, acc, lse, merge=True,
                         phases=_phases, key_stream=_side_stream(dev, 3 + 2 * i) if apart else None,
                         defer_stage2=True)
        merges.append((fin, ls))
        if apart and i + 1 < len(pl.levels):
            continue
        for fin, ls in merges:
            _join(ls)
            if ev is not None:
                torch.cuda.current_stream(dev).wait_event(ev)
                ev = None
            fin()
        merges = []
    _join(ex)
    if ex is not None:
        # allocated on the side stream when cuDNN made it, and used on the caller's: tell the allocator
        acc.record_stream(torch.cuda.current_stream(dev))
    if acc.dtype == q.dtype or "cast" not in _phases:
        return done(acc)
    return done(acc.to(q.dtype))


def _tuned(pl: KernelPlan) -> KernelPlan:
    if not TUNE:
        return pl
    import dataclasses
    return dataclasses.replace(pl, **{x: y for x, y in TUNE.items() if x not in _TUNE_EXTRA})


def state_views(pl: KernelPlan, state: torch.Tensor):
    """``(lse [B, H, N] float32, [per problem batch: name -> view]) `` of a state buffer (``state_layout``)."""
    lay = pl.state_layout()
    if state.dtype != torch.uint8 or state.dim() != 1 or state.numel() != lay.nbytes:
        raise ValueError(f"MuSe state: expected a uint8 tensor of {lay.nbytes} bytes for this plan, got "
                         f"{state.dtype} {tuple(state.shape)}")
    dt = {"f32": torch.float32, "i32": torch.int32, "sum": pl.summary_dtype}
    off, n = lay.lse
    lse = state[off:off + 4 * n].view(torch.float32).view(pl.batch, pl.heads, pl.n)
    levels = []
    for parts in lay.levels:
        views = {}
        for name, (off, n, kind) in parts.items():
            t = dt[kind]
            views[name] = state[off:off + n * t.itemsize].view(t)
        levels.append(views)
    return lse, levels


def _alert_not_deterministic() -> None:
    """torch.use_deterministic_algorithms(True) is on: raise (or warn, with warn_only), as torch's own
    nondeterministic CUDA ops do."""
    msg = ("the Triton MuSe forward is not deterministic: the k-means sums are float atomics and tokens take "
           "their places in a cluster in arrival order, so runs differ in rounding. Use impl='reference' or "
           "torch.use_deterministic_algorithms(True, warn_only=True).")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        import warnings
        warnings.warn(msg)
    else:
        raise RuntimeError(msg)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _init_index(valid, lv, Hkv, C):
    """Initial centroid tokens of the key sets under a padding mask: the evenly spaced valid tokens."""
    B = valid.shape[0]
    S, P = lv.key_len, lv.pairs
    vb = valid.bool()
    if lv.pair_stride:
        sets = vb.unfold(1, S, lv.pair_stride)[:, :P]            # [B, P, S]
    else:
        sets = vb[:, None, :S]
    cs = torch.cumsum(sets.to(torch.int32), -1)
    nv = cs[..., -1:]
    c = torch.arange(C, device=valid.device, dtype=torch.int64)
    rank = ((2 * c + 1) * nv.clamp(min=1).to(torch.int64)) // (2 * C)   # [B, P, C]
    idx = torch.searchsorted(cs.contiguous(), (rank + 1).to(torch.int32).contiguous())
    idx = torch.where(nv > 0, idx, torch.zeros_like(idx)).clamp(max=S - 1)
    return idx[:, None].expand(B, Hkv, P, C).reshape(B * Hkv * P, C).to(torch.int32).contiguous()


def _level(mod, pl: KernelPlan, lv, kept, q, k, v, valid, scale, Z, G, Hkv, N, M, out, lse, *, merge, phases,
           key_stream=None, defer_stage2=False):
    """One acausal MuSe problem batch. The query side (k-means, scatter, centroids and directions) runs on the
    caller's stream; the key side (k-means, scatter) and the guard samples' exact attention run at the same
    time on a side stream (on CUDA; ``key_stream``, else side stream 0), joined before stage 1.
    ``defer_stage2``: return stage 2's launch as a function instead of running it (it reads only q, the
    kept state and out/lse, so it may run later on another stream)."""
    dev = q.device
    spec = pl.spec
    BD, BDV = spec.bd, spec.bdv
    P = lv.pairs
    NSq, NSk = Z * P * G, Z * P
    Cq, Ck = lv.q_clusters, lv.k_clusters
    BCq, BCk = _pow2(Cq), _pow2(Ck)
    T = pl.kmeans_iters
    Lf, Lk, La = lv.fit_len, lv.key_len, lv.ans_len
    BN, BNS = pl.bn_kmeans, pl.bn_scatter
    A = G * Cq
    f32, i32 = torch.float32, torch.int32
    nw = pl.warps
    kw_k = dict(num_warps=pl.warps_kmeans)
    kw_s = dict(num_warps=pl.warps_stage)
    if pl.stages_kmeans:
        kw_k["num_stages"] = pl.stages_kmeans
    if pl.stages_stage:
        kw_s["num_stages"] = pl.stages_stage
    kw_s2 = dict(kw_s, num_warps=pl.warps_stage2 or pl.warps_stage)
    if pl.maxnreg_stage2:
        kw_s2["maxnreg"] = pl.maxnreg_stage2
    if pl.maxnreg_stage1:
        kw_s["maxnreg"] = pl.maxnreg_stage1
    pa = pl.pos_atomic
    tiles = functools.partial(_tiles, target=pl.kmeans_programs, fixed=pl.kmeans_tiles)
    ftiles = functools.partial(_tiles, target=pl.kmeans_fit_programs or pl.kmeans_programs,
                               most=pl.kmeans_fit_max_tiles)
    BNF = pl.bn_kmeans_fit or BN
    kw_kf = dict(kw_k, num_warps=pl.warps_kmeans_fit or pl.warps_kmeans)

    def pass_cfg(final, ns, length, r, t_final):
        """Token stride, tile, tiles per program, programs per set and launch options of one k-means pass:
        the final pass reads every token, a fit pass every r-th, each with its own settings."""
        if final:
            return 1, BN, t_final, triton_cdiv(length, BN * t_final), kw_k
        t = ftiles(ns, triton_cdiv(length, r), BNF)
        return r, BNF, t, triton_cdiv(triton_cdiv(length, r), BNF * t), kw_kf

    fit_off, k_off, ps = 0, 0, lv.pair_stride
    rq, rk = kmeans_fit_stride(Lf, Cq), kmeans_fit_stride(Lk, Ck)
    if "fit_stride" in TUNE:
        rq = rk = int(TUNE["fit_stride"])
    tq, tk = tiles(NSq, Lf, BN), tiles(NSk, Lk, BN)
    npq, npk = triton_cdiv(Lf, BN * tq), triton_cdiv(Lk, BN * tk)
    ta = tiles(NSq, La, BN)
    npa = triton_cdiv(La, BN * ta)
    ns = min(Lf, GUARD_SAMPLES)
    BS = guard_sample_block(_interp())
    nsb = triton_cdiv(G * ns, BS)
    KS = guard_chunks(NSk, nsb, Lk, _interp())      # the guard samples' key set, split for parallelism

    # what the backward needs (``kept``: views into the op's state, counts and λ already zero) and forward-only
    # scratch, all allocated before the streams fork: zero-initialised (k-means sums and counts of the fit
    # passes) and uninitialised (the rest)
    # (the final passes sum nothing, the key side needs no sums and centroid_dir sums the query members; but
    # without the dipole the query side's final pass sums them, as centroid_dir then gathers nothing else)
    mean_sums = not spec.dipole
    zbuf, (qsums0, ksums0, qcnt0, kcnt0) = _alloc(
        dev, f32, [((T + mean_sums) * NSq * Cq * BD, f32), (T * NSk * Ck * BD, f32), (T * NSq * Cq, i32),
                   (T * NSk * Ck, i32)], zero=True)
    qsums, ksums = _split(qsums0, T + mean_sums), _split(ksums0, T) + [zbuf]
    if not mean_sums:
        qsums.append(zbuf)
    qcnt = _split(qcnt0, T) + [kept["qcnt"]]
    kcnt = _split(kcnt0, T) + [kept["kcnt"]]
    parts = [(T * NSq * Cq * BD, f32), ((T + 1) * NSq * Cq * BD, f32),   # kmu of the fit passes, qmu
             (NSq * Lf, i32), (NSk * Lk, i32), (NSk * Lk, i32),         # q positions; k assign, positions
             (NSq * npq * Cq, i32), (NSk * npk * Ck, i32),              # per-program bases
             (0 if lv.same else NSq * Lf, i32)]                         # fit-set order (answer set's is kept)
    parts += [(0, i32)] * 3 if lv.same else [(NSq * La, i32), (NSq * La, i32), (NSq * npa * Cq, i32)]
    parts += [(NSk * G * ns * KS * BDV, f32), (NSk * G * ns * KS, f32)] if spec.dipole else [(0, f32)] * 2
    (kmu0, qmu, qpos, kassign, kpos, qpb, kpb, qperm, aassign, apos, apb, po, plse) = _alloc(dev, f32, parts)[1]
    qmu = qmu.view(T + 1, -1)
    kmu = _split(kmu0, T) + [kept["kmu"]]
    qassign, kperm, qbar, beta, kt, vt = (kept[x] for x in ("qassign", "kperm", "qbar", "beta", "kt", "vt"))
    if spec.dipole:
        u, sig, gs, lam = kept["u"], kept["sig"], kept["gs"], kept["lam"]
    else:
        u, sig, gs, po, plse, lam = qbar, beta, vt, vt, beta, beta
    aperm, qord, kord = kept["aperm"], kept["qord"], kept["kord"]
    if lv.same:
        qperm, acount, aord = aperm, qcnt[T], qord
    else:
        acount, aord = kept["acnt"], kept["aord"]
    init = _init_index(valid, lv, Hkv, Ck) if valid is not None else None
    dummy = zbuf
    side = (key_stream or _side_stream(dev)) if pl.overlap else None

    with _fork(side):
        # key side: Lloyd passes, counting-sort scatter, and the guard samples' exact attention
        if "cluster" in phases:
            for t in range(T + 1):
                final, prev = t == T, max(t - 1, 0)
                r_k, bn, t_k, nprog, kw_p = pass_cfg(final, NSk, Lk, rk, tk)
                mod.kmeans_pass[(NSk, nprog)](
                    k, 1.0, init if init is not None else dummy, kmu[prev], ksums[prev], kcnt[prev], kmu[t],
                    ksums[t], kcnt[t], kassign, kpos, kpb, valid if valid is not None else dummy,
                    1, P, M, k_off, ps, Lk, Hkv, r_k, npk,
                    C=Ck, BC=BCk, BN=bn, TILES=t_k, MODE=0 if t == 0 else 1, INIT_IDX=init is not None,
                    HAS_VALID=valid is not None, SUMS=not final, FINAL=final, POS_ATOMIC=pa, **kw_p)
            mod.scatter_perm[(NSk, triton_cdiv(Lk, BNS))](
                kcnt[T], kassign, kpos, kpb, kperm, kord, 1, P, M, k_off, ps, Lk, npk, BN * tk,
                C=Ck, BC=BCk, BN=BNS, POS_ATOMIC=pa, BY_SIZE=pl.size_order, num_warps=nw)
        if spec.dipole and "stage1" in phases:
            mod.guard_exact[(NSk, KS, nsb)](
                q, k, v, scale, valid if valid is not None else q, po, plse,
                G, P, M, k_off, ps, Lk, N, fit_off, ps, Lf, ns, Hkv, KS,
                BS=BS, BN=pl.bn_exact, HAS_VALID=valid is not None, num_warps=nw)
    # query side, on the caller's stream meanwhile
    if "cluster" in phases:
        for t in range(T + 1):
            final, prev = t == T, max(t - 1, 0)
            r_q, bn, t_q, nprog, kw_p = pass_cfg(final, NSq, Lf, rq, tq)
            mod.kmeans_pass[(NSq, nprog)](
                q, scale, dummy, qmu[prev], qsums[prev], qcnt[prev], qmu[t], qsums[t], qcnt[t], qassign, qpos, qpb,
                dummy, G, P, N, fit_off, ps, Lf, Hkv, r_q, npq,
                C=Cq, BC=BCq, BN=bn, TILES=t_q, MODE=0 if t == 0 else 1, INIT_IDX=False, HAS_VALID=False,
                SUMS=mean_sums or not final, FINAL=final, POS_ATOMIC=pa, **kw_p)
        mod.scatter_perm[(NSq, triton_cdiv(Lf, BNS))](
            qcnt[T], qassign, qpos, qpb, qperm, qord, G, P, N, fit_off, ps, Lf, npq, BN * tq,
            C=Cq, BC=BCq, BN=BNS, POS_ATOMIC=pa, BY_SIZE=pl.size_order, num_warps=nw)
        mod.centroid_dir[(NSq, Cq)](
            q, scale, qmu[T], qsums[T], qcnt[T], qperm, qord, qbar, u, G, P, N, fit_off, ps, Lf,
            C=Cq, BC=BCq, BN=pl.bn_centroid or min(pl.bn_stage1, 64), POWER_ITERS=POWER_ITERS,
            POWER_DOT=pl.power_dot, MEAN_SUMS=mean_sums, num_warps=pl.warps_centroid or nw)
        if not lv.same:
            mod.kmeans_pass[(NSq, npa)](
                q, scale, dummy, qbar, dummy, acount, dummy, dummy, acount, aassign, apos, apb, dummy,
                G, P, N, lv.ans_off, ps, La, Hkv, 1, npa,
                C=Cq, BC=BCq, BN=BN, TILES=ta, MODE=2, INIT_IDX=False, HAS_VALID=False, SUMS=False, FINAL=True,
                POS_ATOMIC=pa, **kw_k)
            mod.scatter_perm[(NSq, triton_cdiv(La, BNS))](
                acount, aassign, apos, apb, aperm, aord, G, P, N, lv.ans_off, ps, La, npa, BN * ta,
                C=Cq, BC=BCq, BN=BNS, POS_ATOMIC=pa, BY_SIZE=pl.size_order, num_warps=nw)
    _join(side)
    BA = pl.ba_stage1
    if "stage1" in phases:
        mod.stage1[(NSk, triton_cdiv(Ck, pl.jb_stage1), triton_cdiv(A, BA))](
            k, v, qbar, u, kperm, kcnt[T], kord, kmu[T], kt, vt, beta, gs, sig, G, P, M, k_off, ps, Lk,
            CQ=Cq, CK=Ck, BCK=BCk, BA=BA, BN=pl.bn_stage1, JB=pl.jb_stage1, **kw_s)
        if spec.dipole:
            mod.guard[(NSq, ns)](q, scale, qbar, u, qassign, kt, vt, beta, gs, sig, po, plse, lam,
                                 G, P, N, fit_off, ps, Lf, ns, KS, CQ=Cq, CK=Ck, BCK=BCk, BKS=_pow2(KS, 2),
                                 num_warps=pl.warps_guard or nw)
            if _DEBUG is not None:
                _DEBUG.update(kassign=kassign, qcnt=qcnt, kcnt=kcnt, numden=lam.clone(), kt=kt, vt=vt, beta=beta,
                              gs=gs, sig=sig, po=po, plse=plse, qbar=qbar, u=u, qassign=qassign,
                              dims=(NSq, ns, Cq, Ck, BD, BDV, G, Lf, KS))
    def stage2():
        if "stage2" in phases:
            mod.stage2[(NSq, Cq)](q, scale, aperm, acount, aord, kt, vt, beta, gs, sig, qbar, u, lam, out, lse,
                                  G, P, N, lv.ans_off, ps, La,
                                  CQ=Cq, CK=Ck, BCQ=BCq, BCK=BCk, BM=pl.bm_stage2, MERGE=merge,
                                  **kw_s2)
    if defer_stage2:
        return stage2
    stage2()


def _level_state(pl: KernelPlan, lv, kept: dict) -> dict:
    """What ``_level_backward`` reads of one problem batch: the kept views (``state_views``) under the
    backward's names, with the monopole's unused inputs aliased, and the batch's sizes."""
    Z, G = pl.batch * pl.kv_heads, pl.groups
    P = lv.pairs
    st = dict(qassign=kept["qassign"], fcnt=kept["qcnt"], qperm=kept["aperm"],
              qcnt=kept["qcnt"] if lv.same else kept["acnt"], qord=kept["qord"] if lv.same else kept["aord"],
              kperm=kept["kperm"], kcnt=kept["kcnt"], kord=kept["kord"],
              kmu=kept["kmu"], qbar=kept["qbar"], kt=kept["kt"], vt=kept["vt"], beta=kept["beta"])
    if pl.spec.dipole:
        st.update(u=kept["u"], lam=kept["lam"], gs=kept["gs"], sig=kept["sig"])
    else:
        st.update(u=kept["qbar"], lam=kept["beta"], gs=kept["vt"], sig=kept["beta"])
    st.update(NSq=Z * P * G, NSk=Z * P, Cq=lv.q_clusters, Ck=lv.k_clusters, A=G * lv.q_clusters, P=P,
              Lf=lv.fit_len, Lk=lv.key_len, La=lv.ans_len, ans_off=lv.ans_off, ps=lv.pair_stride)
    return st


def _split(t: torch.Tensor, n: int):
    """``n`` equal consecutive slices of a flat tensor."""
    sz = t.numel() // n if n else 0
    return [t[i * sz:(i + 1) * sz] for i in range(n)]


def _alloc(dev, dtype, parts, zero=False):
    """One buffer of ``dtype`` cut into views: ``parts`` = [(elements, view dtype of the same size)]; each
    piece starts at a multiple of 16 elements. Returns (buffer, views)."""
    sizes = [-(-n // 16) * 16 for n, _ in parts]
    buf = (torch.zeros if zero else torch.empty)(max(sum(sizes), 1), device=dev, dtype=dtype)
    out, o = [], 0
    for (n, dt), sz in zip(parts, sizes):
        piece = buf[o:o + n]
        out.append(piece if dt == dtype else piece.view(dt))
        o += sz
    return buf, out


_SIDE: dict = {}


def _side_stream(dev, i: int = 0):
    """Side stream ``i`` of a CUDA device (None elsewhere: the interpreter runs everything in order)."""
    if dev.type != "cuda":
        return None
    key = (dev.index if dev.index is not None else torch.cuda.current_device(), i)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device=key[0])
    return _SIDE[key]


class _fork:
    """``with _fork(side):`` runs the block on ``side`` after the work queued so far on the current stream."""

    def __init__(self, side):
        self.side = side
        self.ctx = None

    def __enter__(self):
        if self.side is not None:
            self.side.wait_stream(torch.cuda.current_stream(self.side.device))
            self.ctx = torch.cuda.stream(self.side)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False


def _join(side) -> None:
    """The current stream waits for everything queued on ``side``."""
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)


def _tiles(ns: int, length: int, bn: int, target: int = 264, most: int = 16, fixed: int = 0) -> int:
    """Tiles of BN tokens per k-means program: ``fixed``, else as many (up to ``most``) as keep >= ``target``
    programs (264: 2 per H100 SM)."""
    if _interp():
        return 2
    if fixed:
        return fixed
    for t in (16, 8, 4, 2):
        if t <= most and ns * triton_cdiv(length, bn * t) >= target:
            return t
    return 1


def _interp() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def _size_order(cnt):
    """``[sets, C]`` counts -> each set's clusters by size, largest first, ties in index order (int32; what
    ``scatter_perm`` writes for the per-cluster kernels)."""
    return torch.sort(cnt.to(torch.int64), dim=1, descending=True, stable=True).indices.to(torch.int32).contiguous()


def _pad_rows(t, width):
    """``[..., w]`` -> contiguous float32 ``[..., width]`` rows, zero-padded (the kernels' summary layout)."""
    out = torch.zeros(*t.shape[:-1], width, device=t.device, dtype=torch.float32)
    out[..., :t.shape[-1]] = t
    return out


def stage2_backward(q, dout, q_assign, kt, vt, beta, g, sigma, qbar, u, lam, *, scale, query_clusters,
                    merged=None):
    """Gradients through stage 2 (summary attention + dipole) with the Triton kernel ``stage2_bwd``, on
    tensors in the reference's layout (sorting and padding done here): the stage on its own, for tests and
    inspection; ``muse_attention_backward`` launches the same kernel on the forward's state.

    Args:
        q: ``[B, H, N, D]`` unscaled queries; dout: ``[B, H, N, Dv]`` upstream gradient of the output;
            merged: optional ``(lse, o)``: the final log-sum-exp ``[B, H, N]`` and output ``[B, H, N, Dv]`` when
            stage 2's output was LSE-merged with other parts (a causal level); the gradient is then the one
            through the merged output.
        q_assign: ``[Z, G, N]`` query cluster in ``[0, query_clusters)`` (Z = B·Hkv, G = H / Hkv).
        kt, vt, beta, g, sigma: the summaries ``[Z, A, Ck, ·]`` (A = G·query_clusters), g/sigma None for the
            monopole; qbar, u: ``[Z, A, D]`` scaled tilt points and directions; lam: ``[Z, G]`` dipole scales.

    Returns:
        ``(dq [B, H, N, D], (dkt, dvt, dbeta, dg), dqbar [Z, A, D])``, float32; dg None for the monopole.
        λ, u, σ and the assignments are constants, as in the reference.
    """
    B, H, N, D = q.shape
    Z, G = q_assign.shape[:2]
    Cq = int(query_clusters)
    A, Ck, Dv = kt.shape[1], kt.shape[2], vt.shape[-1]
    dipole = g is not None
    pl = plan(batch=B, heads=H, kv_heads=H // G, n=N, m=N, head_dim=D, value_dim=Dv, dtype=q.dtype, causal=False,
              clusters=Ck, query_clusters=Cq, dipole=dipole)
    mod = module_for(pl)
    BD, BDV = pl.spec.bd, pl.spec.bdv
    dev, f32 = q.device, torch.float32

    NS = Z * G
    a = q_assign.reshape(NS, N).to(torch.int64)
    perm = torch.argsort(a, dim=1, stable=True).to(torch.int32).contiguous()
    cnt = torch.zeros(NS, Cq, device=dev, dtype=torch.int64).scatter_add_(1, a, torch.ones_like(a))
    cnt = cnt.to(torch.int32).contiguous()
    order = _size_order(cnt)
    lam2 = torch.stack([lam.reshape(NS).to(f32), torch.ones(NS, device=dev, dtype=f32)], 1).contiguous()
    ktp, vtp = _pad_rows(kt, BD), _pad_rows(vt, BDV)
    gp = _pad_rows(g, BDV) if dipole else vtp
    sg = sigma.to(f32).contiguous() if dipole else beta.to(f32).contiguous()
    qb, uu = _pad_rows(qbar, BD), (_pad_rows(u, BD) if dipole else _pad_rows(qbar, BD))
    dq = torch.zeros(B, H, N, D, device=dev, dtype=f32)
    dkt, dvt = torch.zeros_like(ktp), torch.zeros_like(vtp)
    dbeta = torch.zeros(Z, A, Ck, device=dev, dtype=f32)
    dg = torch.zeros_like(vtp) if dipole else dvt
    dqb = torch.zeros(Z, A, BD, device=dev, dtype=f32)
    lse_f = delta = dq
    if merged is not None:
        lse_f = merged[0].to(f32).contiguous()
        delta = (dout.to(f32) * merged[1].to(f32)).sum(-1).contiguous()
    mod.stage2_bwd[(NS, Cq)](
        q.contiguous(), float(scale), perm, cnt, order, ktp, vtp, beta.to(f32).contiguous(), gp, sg, qb, uu, lam2,
        dout.contiguous(), lse_f, delta, dq, dkt, dvt, dbeta, dg, dqb,
        G, 1, N, 0, 0, N, CQ=Cq, CK=Ck, BCQ=_pow2(Cq), BCK=_pow2(Ck), BM=pl.bm_stage2_bwd,
        GLOBAL=merged is not None, ADD=True, num_warps=pl.warps_bwd)
    dkt = dkt + dbeta[..., None] * qb[:, :, None, :]      # the kernel stores dk̃ − dβ·q̄
    grads = (dkt[..., :D], dvt[..., :Dv], dbeta, dg[..., :Dv] if dipole else None)
    return dq, grads, dqb[..., :D]


def stage1_backward(k, v, key_assign, qbar, u, dkt, dvt, dbeta, dg, *, key_clusters):
    """Gradients through stage 1 (the tilted summaries) with the Triton kernel ``stage1_bwd``.

    Args:
        k, v: ``[Z, M, D]``, ``[Z, M, Dv]`` keys and values (Z = B·Hkv); key_assign: ``[Z, M]`` key cluster in
            ``[0, key_clusters]`` (``key_clusters`` = masked key); qbar, u: ``[Z, A, D]`` scaled tilt points and
            dipole directions (u None for the monopole); dkt, dvt, dbeta, dg: upstream gradients of the
            summaries ``[Z, A, Ck, ·]`` (as ``stage2_backward`` returns them; dg None for the monopole).

    Returns:
        ``(dk [Z, M, D], dv [Z, M, Dv], dqbar [Z, A, D])`` float32 (u and σ are constants, as in the reference).
    """
    Z, M, D = k.shape
    Dv = v.shape[-1]
    A = qbar.shape[1]
    Ck = int(key_clusters)
    dipole = u is not None
    pl = plan(batch=Z, heads=1, kv_heads=1, n=M, m=M, head_dim=D, value_dim=Dv, dtype=k.dtype, causal=False,
              clusters=Ck, query_clusters=A, dipole=dipole)
    mod = module_for(pl)
    BD, BDV = pl.spec.bd, pl.spec.bdv
    dev, f32 = k.device, torch.float32

    ka = key_assign.to(torch.int64)
    permk = torch.argsort(ka, dim=1, stable=True).to(torch.int32).contiguous()
    cntk = torch.zeros(Z, Ck + 1, device=dev, dtype=torch.int64).scatter_add_(1, ka, torch.ones_like(ka))
    cntk = cntk[:, :Ck].to(torch.int32).contiguous()
    ordk = _size_order(cntk)
    qb = _pad_rows(qbar, BD)
    uu = _pad_rows(u, BD) if dipole else qb
    # per-cluster key means: stage 1's shift of u·k (any per-cluster shift gives the same gradient)
    kmu = torch.zeros(Z, Ck + 1, BD, device=dev, dtype=f32)
    kmu[..., :D].scatter_add_(1, ka[..., None].expand(Z, M, D), k.to(f32))
    kmu = (kmu[:, :Ck] / cntk.to(f32).clamp(min=1)[..., None]).contiguous()
    # the kernel reads dk̃ − dβ·q̄ (as stage2_bwd stores it)
    dktp = _pad_rows(dkt.to(f32) - dbeta.to(f32)[..., None] * qbar.to(f32)[:, :, None, :], BD)
    dvtp = _pad_rows(dvt, BDV)
    dgp = _pad_rows(dg, BDV) if dipole else dvtp
    dk = torch.zeros(Z, M, D, device=dev, dtype=f32)
    dv = torch.zeros(Z, M, Dv, device=dev, dtype=f32)
    dqb = torch.zeros(Z, A, BD, device=dev, dtype=f32)
    BA = pl.ba_stage1_bwd
    mod.stage1_bwd[(Z, Ck, triton_cdiv(A, BA))](
        k.contiguous(), v.contiguous(), qb, uu, permk, cntk, ordk, kmu, dktp, dvtp, dktp, dgp,
        dktp, dvtp, dbeta.to(f32).contiguous(), dgp, dk, dv, dqb, A, 1, M, 0, 0, M, CQ=1, CK=Ck, BCK=_pow2(Ck),
        BA=BA, BN=pl.bn_stage1_bwd, KV_ATOMIC=A > BA, STORED=False, ADD=True, num_warps=pl.warps_bwd)
    return dk, dv, dqb[..., :D]


# The op's backward on CUDA uses the Triton backward (checked on the H100 against the reference's autograd:
# tests/test_triton_gpu.py, benchmarks/backward_accuracy.py); False: recompute through the reference.
BACKWARD_ON_GPU = True


def backward_supported(q, k, v, *, causal=False, clusters=128, query_clusters=None, dipole=True, kmeans_iters=2,
                       block_size=256, key_padding_mask=None, **_) -> bool:
    """Whether ``muse_attention_backward`` can run this call: the forward takes it and the backward's tiles
    fit the GPU (``KernelPlan.backward_fits``)."""
    ok, _why = supports(q, k, v, causal=causal, key_padding_mask=key_padding_mask, clusters=clusters,
                        query_clusters=query_clusters)
    return ok and make_plan(q, k, v, causal=causal, clusters=clusters, query_clusters=query_clusters,
                            dipole=dipole, kmeans_iters=kmeans_iters, block_size=block_size,
                            key_padding_mask=key_padding_mask).backward_fits()


def muse_attention_backward(grad, q, k, v, *, causal=False, scale=None, clusters=128, query_clusters=None,
                            dipole=True, kmeans_iters=2, block_size=256, key_padding_mask=None, saved=None):
    """Gradients ``(dq, dk, dv)`` of the MuSe op (acausal or causal) on the Triton kernels.

    ``saved``: ``(out, state)`` from ``muse_attention(..., return_state=True)`` of the same call (``out`` may
    be None for the acausal op): the backward reads that call's clustering, summaries and log-sum-exp. Without
    it the forward kernels run once more for them; that re-run may place a boundary token in another cluster
    than the call's forward did (float atomics in the k-means sums), and the gradient is then the exact
    gradient of that clustering's MuSe.

    Per MuSe problem batch: ``stage2_bwd`` (to q, the summaries and the tilt points through t), ``stage1_bwd``
    (summaries to k, v and the tilt points) and the centroid step (a tilt point is the mean of its fit set's
    scaled queries: each member gets scale·dq̄/n); the causal op adds the exact part's backward (torch's
    cuDNN or flash SDPA backward, else ``exact_causal_bwd_*``). The causal parts are LSE-merged in the
    forward, so their backward uses the final log-sum-exp L and D = dO·o (one softmax over all parts' keys).
    As in the reference, the assignments, the directions u, λ and σ are constants.
    """
    if not backward_supported(q, k, v, causal=causal, clusters=clusters, query_clusters=query_clusters,
                              dipole=dipole, kmeans_iters=kmeans_iters, block_size=block_size,
                              key_padding_mask=key_padding_mask):
        raise ValueError("the Triton MuSe backward does not take this call (see backward_supported)")
    kw = dict(causal=causal, clusters=clusters, query_clusters=query_clusters, dipole=dipole,
              kmeans_iters=kmeans_iters, block_size=block_size, key_padding_mask=key_padding_mask)
    if saved is None:
        # acausal: the backward needs the clustering, the summaries and λ, not stage 2's output
        out, _lse, state = muse_attention(q, k, v, scale=scale, return_state=True,
                                          _phases=ALL_PHASES if causal else ALL_PHASES - {"stage2"}, **kw)
    else:
        out, state = saved
        if causal and out is None:
            raise ValueError("the causal backward needs the forward's output")
    pl = _tuned(make_plan(q, k, v, **kw))
    mod = module_for(pl)
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    lse, kept = state_views(pl, state)
    out = out.contiguous() if out is not None else None
    levels = [_level_state(pl, lv, kp) for lv, kp in zip(pl.levels, kept)]
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    dev, f32 = q.device, torch.float32
    q, k, v, grad = q.contiguous(), k.contiguous(), v.contiguous(), grad.contiguous()
    valid = None if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)
    kw = dict(num_warps=pl.warps_bwd)
    # gradient accumulators: the input dtype on the 16-bit path where no launch adds to them by float atomics
    # (every read-modify-write then rounds once more; no float32 copies and casts), else float32
    # stage1_bwd adds dk/dv by float atomics where a level's centroids span several blocks
    kv_atomic = any(G * lv.q_clusters > pl.ba_stage1_bwd for lv in pl.levels)
    acc = q.dtype if pl.spec.native and pl.bwd_16bit_accumulators and not kv_atomic else f32
    if not causal:
        # stage2_bwd is the first writer of every dq row (each query is in one cluster) and stage1_bwd, with all
        # centroids in one block, the only writer of every dk/dv row (each key is in one cluster): they write
        # instead of adding, and nothing is zero-filled. A padding mask leaves masked keys in no cluster
        fresh = valid is None and not kv_atomic
        new = torch.empty if fresh else torch.zeros
        dq = new(B, H, N, D, device=dev, dtype=acc)
        dk = new(B, Hkv, M, D, device=dev, dtype=acc)
        dv = new(B, Hkv, M, Dv, device=dev, dtype=acc)
        if fresh and _interp():
            for t in (dq, dk, dv):   # in the tests, a row no kernel writes shows as NaN
                t.fill_(float("nan"))
        _level_backward(mod, pl, levels[0], q, k, v, grad, None, None, dq, dk, dv, s, G, N, M, first=fresh, **kw)
    else:
        delta = torch.empty(B, H, N, device=dev, dtype=f32)
        R = B * H * N
        # D = dO·o (memory-bound) on a side stream beside the exact part's backward (compute-bound)
        side = _side_stream(dev, 1) if pl.overlap and TUNE.get("row_dot_side", True) else None
        with _fork(side):
            mod.row_dot[(triton_cdiv(R, 64),)](grad, out, delta, R, BR=64, num_warps=4)
        # the exact part's gradients start the accumulators (no zero fill)
        grads = _exact_backward_sdpa(grad, q, k, v, out, lse, s, pl.exact_chunk, valid)
        _join(side)
        if grads is not None:
            dq, dk, dv = (t.to(acc).contiguous() for t in grads)
        else:
            dq = torch.zeros(B, H, N, D, device=dev, dtype=acc)
            dk = torch.zeros(B, Hkv, M, D, device=dev, dtype=acc)
            dv = torch.zeros(B, Hkv, M, Dv, device=dev, dtype=acc)
            BM, BN = pl.bm_exact_bwd, pl.bn_exact_bwd
            vp = valid if valid is not None else q
            mod.exact_causal_bwd_dkdv[(B * Hkv, triton_cdiv(N, BN))](
                q, k, v, s, vp, grad, lse, delta, dk, dv, G, Hkv, N, pl.exact_chunk,
                BM=BM, BN=BN, HAS_VALID=valid is not None, **kw)
            mod.exact_causal_bwd_dq[(B * H, triton_cdiv(N, BM))](
                q, k, v, s, vp, grad, lse, delta, dq, G, Hkv, N, pl.exact_chunk,
                BM=BM, BN=BN, HAS_VALID=valid is not None, **kw)
        for st in levels:
            _level_backward(mod, pl, st, q, k, v, grad, lse, delta, dq, dk, dv, s, G, N, M, **kw)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# The exact causal part's backward: the first of these torch SDPA backward kernels that takes the call, fed
# MuSe's final output and log-sum-exp; the Triton exact_causal_bwd_* kernels where none does (a padding mask,
# float32, N not a multiple of the chunk) or with an empty tuple. cuDNN's took 1.80 ms against flash's
# 2.85 ms for the 4096-token chunks at 16k (B·H = 32, D = 64, H100; benchmarks/exact_bwd_backends.py).
EXACT_BWD_BACKENDS = ("cudnn", "flash")
# The exact causal part's forward, likewise (the op's exact_causal kernel where none takes the call).
EXACT_FWD_BACKENDS = ("cudnn", "flash")
_SDPA_ARGS: dict = {}
_SDPA_FAILED: set = set()


def _sdpa_bookkeeping(backend, dev, dtype, D):
    """The non-varlen, no-dropout forward's bookkeeping outputs (sequence offsets, RNG state), as autograd
    hands them to the backward, from one forward on a tiny input."""
    key = (backend, dev, dtype, D)
    if key not in _SDPA_ARGS:
        t = torch.zeros(1, 1, 16, D, device=dev, dtype=dtype)
        if backend == "cudnn":
            r = torch.ops.aten._scaled_dot_product_cudnn_attention(t, t, t, None, True, 0.0, True, False, scale=1.0)
        else:
            r = torch.ops.aten._scaled_dot_product_flash_attention(t, t, t, 0.0, True, False, scale=1.0)
        _SDPA_ARGS[key] = (r[2], r[3], r[6], r[7])
    return _SDPA_ARGS[key]


def _exact_sdpa_applies(q, k, v, E, valid) -> bool:
    """Whether torch's cuDNN / flash SDPA kernels can do the exact causal part (causal attention inside aligned
    chunks of E tokens, each chunk one sequence of a batch): CUDA, 16-bit, no padding mask, N a multiple of
    E, equal head dims that the kernels take."""
    N, D, Dv = q.shape[2], q.shape[-1], v.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and valid is None and E > 0 and N % E == 0
            and D == Dv and D % 8 == 0 and D <= 256)


def _exact_forward_sdpa(q, k, v, scale, E, valid, lse_out):
    """The exact causal part's output ``[B, H, N, Dv]`` (input dtype, contiguous) from the first of torch's
    cuDNN or flash-attention forward kernels that takes the call, its log-sum-exp written into ``lse_out``
    ``[B, H, N]``; None where neither applies (``_exact_sdpa_applies``) or both raise. cuDNN did these chunks
    faster than the op's own ``exact_causal`` kernel (``docs/kernel-notes.md``, v16)."""
    if not _exact_sdpa_applies(q, k, v, E, valid):
        return None
    B, H, N, D = q.shape
    G = H // k.shape[1]

    def chunks(t):
        return t.reshape(-1, 1, E, t.shape[-1])

    kk, vv = (k, v) if G == 1 else (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    for backend in EXACT_FWD_BACKENDS:
        key = ("fwd", backend, q.device, q.dtype, D)
        if key in _SDPA_FAILED:
            continue
        try:
            if backend == "cudnn":
                r = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    chunks(q), chunks(kk), chunks(vv), None, True, 0.0, True, False, scale=float(scale))
            else:
                r = torch.ops.aten._scaled_dot_product_flash_attention(
                    chunks(q), chunks(kk), chunks(vv), 0.0, True, False, scale=float(scale))
        except (RuntimeError, NotImplementedError) as e:
            _SDPA_FAILED.add(key)
            log.info("exact-part forward: %s not usable here (%s); trying the next", backend, str(e)[:200])
            continue
        lse_out.copy_(r[1].reshape(B, H, N))
        return r[0].reshape(B, H, N, v.shape[-1]).contiguous()
    return None


def _exact_backward_sdpa(grad, q, k, v, out, lse, scale, E, valid):
    """The exact part's gradients ``(dq, dk, dv)`` (causal attention inside aligned chunks of E tokens; input
    dtype, dk/dv float32 when summed over G query heads) by torch's cuDNN or flash-attention backward kernel;
    None where neither applies (no CUDA, not 16-bit, a padding mask, N not a multiple of E, unequal or
    unsupported head dims).

    The backward of one softmax over all parts' keys needs P = exp(s − L) with the final log-sum-exp L and
    D = dO·o with the final output o: passing (o, L) as the "output" and "logsumexp" of each chunk's attention
    gives exactly that (both kernels compute P and D from them, never from their own forward). Each chunk is
    one sequence of a batch of B·H·N/E (a view; keys and values are repeated over the G query heads). A backend
    that raises (unsupported here) is not tried again for that device, dtype and head dim."""
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if not _exact_sdpa_applies(q, k, v, E, valid):
        return None
    G = H // Hkv

    def chunks(t):
        return t.reshape(-1, 1, E, t.shape[-1])

    kk, vv = (k, v) if G == 1 else (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    grads = None
    for backend in EXACT_BWD_BACKENDS:
        key = (backend, q.device, q.dtype, D)
        if key in _SDPA_FAILED:
            continue
        try:
            cq, ck, seed, off = _sdpa_bookkeeping(backend, q.device, q.dtype, D)
            if backend == "cudnn":
                grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                    chunks(grad), chunks(q), chunks(kk), chunks(vv), chunks(out),
                    lse.reshape(-1, 1, E, 1).contiguous(), seed, off, None, cq, ck, E, E, 0.0, True,
                    scale=float(scale))
            else:
                grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                    chunks(grad), chunks(q), chunks(kk), chunks(vv), chunks(out), lse.reshape(-1, 1, E).contiguous(),
                    cq, ck, E, E, 0.0, True, seed, off, scale=float(scale))
            break
        except (RuntimeError, NotImplementedError) as e:
            _SDPA_FAILED.add(key)
            log.info("exact-part backward: %s not usable here (%s); trying the next", backend, str(e)[:200])
    if grads is None:
        return None
    gq, gk, gv = (t.reshape(B, -1, N, t.shape[-1]) for t in grads)
    if G == 1:
        return gq, gk, gv
    return gq, gk.view(B, Hkv, G, N, D).float().sum(2), gv.view(B, Hkv, G, N, Dv).float().sum(2)


def _level_backward(mod, pl, st, q, k, v, grad, lse, delta, dq, dk, dv, s, G, N, M, first=False, **kw):
    """Backward of one MuSe problem batch (``_level``'s state ``st``); adds to dq, dk, dv (float32 or the input dtype).
    ``lse``/``delta`` given: the level's output was LSE-merged (causal), see ``stage2_bwd``'s GLOBAL. ``first``:
    dq, dk, dv hold nothing yet, and the kernels write their rows (the caller has checked that they write all)."""
    NSq, NSk, Cq, Ck, A, P = st["NSq"], st["NSk"], st["Cq"], st["Ck"], st["A"], st["P"]
    BD, BDV = pl.spec.bd, pl.spec.bdv
    D = q.shape[-1]
    dev, f32 = q.device, torch.float32
    n_sum = NSk * A * Ck
    # stage2_bwd writes every summary row's gradient (and, with the dipole, every dq̄ row): no zero fill. On the
    # 16-bit path the k̃, ṽ, g gradients are stored in the input dtype (stage1_bwd rounds them to it before use;
    # the k̃ one centred, see stage2_bwd): half the bytes of the round trip between the two kernels
    sdt = q.dtype if pl.spec.native else f32
    dkt = torch.empty(n_sum * BD, device=dev, dtype=sdt)
    dvt = torch.empty(n_sum * BDV, device=dev, dtype=sdt)
    dbeta = torch.empty(n_sum, device=dev, dtype=f32)
    dg = torch.empty(n_sum * BDV, device=dev, dtype=sdt) if pl.spec.dipole else dvt
    dqb = (torch.empty if pl.spec.dipole else torch.zeros)(NSq * Cq * BD, device=dev, dtype=f32)
    merged = lse is not None
    mod.stage2_bwd[(NSq, Cq)](
        q, s, st["qperm"], st["qcnt"], st["qord"], st["kt"], st["vt"], st["beta"], st["gs"], st["sig"], st["qbar"], st["u"],
        st["lam"], grad, lse if merged else dq, delta if merged else dq, dq, dkt, dvt, dbeta, dg, dqb,
        G, P, N, st["ans_off"], st["ps"], st["La"],
        CQ=Cq, CK=Ck, BCQ=_pow2(Cq), BCK=_pow2(Ck), BM=pl.bm_stage2_bwd, GLOBAL=merged, ADD=not first, **kw)
    mod.stage1_bwd[(NSk, Ck, triton_cdiv(A, pl.ba_stage1_bwd))](
        k, v, st["qbar"], st["u"], st["kperm"], st["kcnt"], st["kord"], st["kmu"], st["kt"], st["vt"], st["beta"],
        st["gs"], dkt, dvt, dbeta, dg, dk, dv, dqb, G, P, M, 0, st["ps"], st["Lk"], CQ=Cq, CK=Ck, BCK=_pow2(Ck),
        BA=pl.ba_stage1_bwd, BN=pl.bn_stage1_bwd, KV_ATOMIC=A > pl.ba_stage1_bwd, STORED=pl.bwd_stored_moments,
        ADD=not first, **kw)
    # centroid step: q̄_a is the mean of its fit set's scaled queries (an empty cluster has no members)
    Lf = st["Lf"]
    mod.centroid_bwd[(NSq, triton_cdiv(Lf, 64))](dqb, st["fcnt"], st["qassign"], dq, s, G, P, N, st["ps"], Lf,
                                                 CQ=Cq, BN=64, num_warps=4)
