"""MuSe in plain PyTorch: the single source of truth that the Triton kernels and the tests compare against.

The math is written out in ``docs/algorithm.md``; the names here follow it. Per (batch, head), with the
scale s folded into the queries (``qs = s·q``):

1. ``kmeans``: queries and keys are clustered separately (Lloyd, deterministic evenly spaced init,
   assignments without gradient).
2. ``tilted_summaries`` (stage 1): for query cluster a (centroid q̄_a) and key cluster j, weights
   ``w_ai = exp(q̄_a·k_i − m_aj)``, mass ``log Z_aj``, tilted key/value centroids ``k̃_aj, ṽ_aj`` and the bias
   ``β_aj = log Z_aj − q̄_a·k̃_aj``; with the dipole on, also ``g_aj``, the tilted covariance of the key
   projection ``u_a·k`` with the value (u_a: the main direction of the query offsets of cluster a).
3. ``summary_attention`` (stage 2): query n of cluster a attends the C key summaries of cluster a,
   ``softmax_j(qs_n·k̃_aj + β_aj)``; output, log-sum-exp, and the dipole term ``t_n Σ_j p_nj g_aj`` with
   ``t_n = u_a·(qs_n − q̄_a)`` (clipped to a trust region of one tilted std of u_a·k per key cluster).
4. The dipole term is scaled per head by λ ∈ [0, 1], fitted by least squares on a few sample queries whose
   exact attention is computed, so on those samples the corrected output is never worse than the monopole.
5. Causal: exact local blocks, dyadic acausal levels (``muse_compile.lowering.schedule``), log-sum-exp merge.
   Clusters, tilt points, dipole directions and λ of a level are fitted on the *left* segment's queries,
   which all precede the right segment's: no output depends on a later query.

Everything is computed in float32 (float64 for float64 input) and no tensor of size N×M is created;
the largest temporaries are O((N + M)·C) per head, plus chunks bounded by ``_CHUNK_ELEMS``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from muse_compile.lowering.schedule import causal_schedule

__all__ = [
    "muse_attention", "exact_attention", "kmeans", "kmeans_fit_stride", "kmeans_init_index", "guard_sample_index", "tilted_summaries",
    "summary_attention", "merge_partials", "Summaries", "muse_block",
]

_CHUNK_ELEMS = 1 << 22      # bound on the elements of one temporary chunk (16 MiB in float32)
GUARD_SAMPLES = 64          # sample queries per head used to fit the dipole scale λ
POWER_ITERS = 6             # power iterations for the dipole direction
FIT_TOKENS_PER_CLUSTER = 16  # k-means fits centroids on a strided subset keeping this many tokens per cluster
MAX_FIT_STRIDE = 4          # … and at most every 4th token
DIPOLE_TRUST = 1.0          # the dipole may shift u·k's tilted mean by at most this many tilted stds


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- exact


def exact_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, return_lse=False):
    """Exact softmax attention, chunked over queries so no N×M tensor is held at once.

    Shapes as :func:`muse_compile.multipole_attention` (GQA allowed). Computes in the accumulation dtype of
    the input (float32, or float64 for float64). A query with no visible key gets zeros and LSE −inf.
    """
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    cdt = _compute_dtype(q.dtype)
    s = D ** -0.5 if scale is None else scale
    qs = (q.to(cdt) * s).view(B, Hkv, G, N, D)
    kf, vf = k.to(cdt), v.to(cdt)
    rows = max(1, _CHUNK_ELEMS // max(1, B * H * M))
    outs, lses = [], []
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        logits = torch.einsum("bhgnd,bhmd->bhgnm", qs[:, :, :, start:stop], kf)
        allowed = torch.ones(stop - start, M, dtype=torch.bool, device=q.device)
        if causal:
            pos = torch.arange(start, stop, device=q.device)[:, None]
            allowed = allowed & (torch.arange(M, device=q.device)[None, :] <= pos)
        allowed = allowed.view(1, 1, 1, stop - start, M)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask.view(B, 1, 1, 1, M)
        logits = logits.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - _finite_or_zero(lse)[..., None])
        outs.append(torch.einsum("bhgnm,bhmd->bhgnd", p, vf))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(B, H, N, Dv).to(q.dtype)
    lse = torch.cat(lses, dim=3).reshape(B, H, N)
    return (out, lse) if return_lse else out


def _finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


# -------------------------------------------------------------------------------------------- k-means


def guard_sample_index(length: int, samples: int, device=None) -> torch.Tensor:
    """Sample positions ``floor((s + φ)·L / S)``, φ = 0.618…: evenly spaced but offset from the k-means
    init positions (which sit at their own centroids and would make the dipole look useless)."""
    s = torch.arange(samples, device=device, dtype=torch.float64)
    return torch.floor((s + 0.6180339887) * length / samples).long().clamp_(max=length - 1)


def kmeans_init_index(length: int, clusters: int, device=None) -> torch.Tensor:
    """Evenly spaced token positions ``floor((c + 0.5)·L / C)`` used as initial centroids."""
    c = torch.arange(clusters, device=device, dtype=torch.float64)
    return torch.floor((c + 0.5) * length / clusters).long().clamp_(max=length - 1)


@torch.no_grad()
def kmeans_fit_stride(length: int, clusters: int) -> int:
    """Token stride r of the Lloyd updates: centroids are fitted on every r-th token (positions 0, r, 2r, …)
    and only the final assignment reads all tokens. r keeps at least FIT_TOKENS_PER_CLUSTER fitting tokens per
    cluster on average and is at most MAX_FIT_STRIDE: clustering is the largest cost of the op, and the
    centroids of a few thousand tokens are as good as those of all of them (``docs/accuracy.md``)."""
    return max(1, min(MAX_FIT_STRIDE, length // (FIT_TOKENS_PER_CLUSTER * clusters)))


def kmeans(x: torch.Tensor, clusters: int, iters: int, valid: Optional[torch.Tensor] = None):
    """Batched Lloyd k-means on the last two dims of ``x`` ``[..., L, D]``.

    Initial centroids are evenly spaced tokens (among the valid ones when ``valid`` ``[..., L]`` is given).
    ``iters`` Lloyd updates on every r-th token follow (r = :func:`kmeans_fit_stride`), then a final
    assignment of all tokens. A token goes to the centroid maximising
    ``x·μ − ½‖μ‖²`` (the nearest; ties to the lowest index); an empty cluster keeps its centroid; invalid
    tokens get the sentinel index ``clusters`` and move no centroid.

    Returns:
        ``(assign [..., L] int64, centroids [..., C, D])`` in the compute dtype.
    """
    *lead, L, D = x.shape
    xf = x.to(_compute_dtype(x.dtype))
    init = kmeans_init_index(L, clusters, x.device)
    if valid is None:
        idx = init.expand(*lead, clusters)
    else:
        # the init-th valid token: order puts valid tokens first, in position order
        order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
        nvalid = valid.sum(-1, keepdim=True).clamp(min=1)
        rank = torch.floor((torch.arange(clusters, device=x.device) + 0.5) * nvalid / clusters).long()
        idx = torch.gather(order, -1, rank.clamp(max=L - 1))
    mu = torch.gather(xf, -2, idx.unsqueeze(-1).expand(*lead, clusters, D))
    r = kmeans_fit_stride(L, clusters)
    for it in range(iters + 1):
        final = it == iters
        xs = xf if final else xf[..., ::r, :]
        assign = (xs @ mu.transpose(-1, -2) - 0.5 * (mu * mu).sum(-1).unsqueeze(-2)).argmax(-1)
        if valid is not None:
            vs = valid if final else valid[..., ::r]
            assign = torch.where(vs, assign, torch.full_like(assign, clusters))
        if final:
            break
        sums, counts = _segment_sum(xs, assign, clusters)
        mu = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), mu)
    return assign, mu


def _segment_sum(x, assign, clusters):
    """Per-cluster sums ``[..., C, D]`` and counts ``[..., C]`` of ``x [..., L, D]``; sentinel C dropped."""
    *lead, L, D = x.shape
    sums = x.new_zeros(*lead, clusters + 1, D).scatter_add(-2, assign.unsqueeze(-1).expand(*lead, L, D), x)
    counts = x.new_zeros(*lead, clusters + 1).scatter_add(-1, assign, torch.ones_like(x[..., 0]))
    return sums[..., :clusters, :], counts[..., :clusters]


# ---------------------------------------------------------------------------------- stage 1: summaries


class Summaries(NamedTuple):
    """Stage-1 output per (query cluster a, key cluster j); a = G·Cq flattened query clusters."""
    kt: torch.Tensor      # [Z, A, Ck, D]   tilted key centroids k̃
    vt: torch.Tensor      # [Z, A, Ck, Dv]  tilted value centroids ṽ
    beta: torch.Tensor    # [Z, A, Ck]      log Z_aj − q̄_a·k̃_aj  (−inf for an empty key cluster)
    g: Optional[torch.Tensor]  # [Z, A, Ck, Dv] dipole: E_p[(u_a·(k−k̃)) (v−ṽ)], or None
    sigma: Optional[torch.Tensor] = None  # [Z, A, Ck] tilted std of u_a·k in the cluster (dipole trust region)


def tilted_summaries(qbar, k, v, key_assign, key_clusters, u=None) -> Summaries:
    """Stage 1: exponentially tilted summaries of each key cluster, seen from each query centroid.

    Args:
        qbar: scaled query centroids ``[Z, A, D]``.
        k, v: keys ``[Z, M, D]``, values ``[Z, M, Dv]``.
        key_assign: ``[Z, M]`` key cluster in ``[0, key_clusters]`` (``key_clusters`` = masked key).
        u: dipole directions ``[Z, A, D]`` (unit, no gradient) or None.
    """
    Z, A, D = qbar.shape
    M, Dv = k.shape[1], v.shape[-1]
    Ck = key_clusters
    valid = key_assign < Ck
    logits = qbar @ k.transpose(-1, -2)                                   # [Z, A, M]
    idx = key_assign.unsqueeze(1).expand(Z, A, M)
    # per-(a, j) max: a constant shift (no gradient needed, log Z is invariant to it)
    masked = logits.detach().masked_fill(~valid.unsqueeze(1), float("-inf"))
    m = masked.new_full((Z, A, Ck + 1), float("-inf")).scatter_reduce(2, idx, masked, "amax")
    m = _finite_or_zero(m)
    shifted = torch.where(valid.unsqueeze(1), logits - torch.gather(m, 2, idx),
                          torch.full_like(logits, float("-inf")))
    w = torch.exp(shifted)                                                # [Z, A, M], 0 for masked keys
    mass = w.new_zeros(Z, A, Ck + 1).scatter_add(2, idx, w)[..., :Ck]    # Σ w  per (a, j)

    feats = [k, v]
    if u is not None:
        proj = u @ k.transpose(-1, -2)                                    # u_a·k_i  [Z, A, M]
    width = D + Dv + (Dv + 1 if u is not None else 0)
    acc = w.new_zeros(Z, A, Ck + 1, width)
    step = max(1, _CHUNK_ELEMS // max(1, Z * A * width))
    for s0 in range(0, M, step):
        s1 = min(M, s0 + step)
        wc = w[:, :, s0:s1, None]
        parts = [wc * k[:, None, s0:s1], wc * v[:, None, s0:s1]]
        if u is not None:
            wp = wc * proj[:, :, s0:s1, None]
            parts += [wp * v[:, None, s0:s1], wp * proj[:, :, s0:s1, None]]
        prod = torch.cat(parts, dim=-1)
        acc = acc.scatter_add(2, idx[:, :, s0:s1, None].expand(Z, A, s1 - s0, width), prod)
    acc = acc[:, :, :Ck]
    nonempty = mass > 0
    inv = torch.where(nonempty, 1.0 / torch.where(nonempty, mass, torch.ones_like(mass)),
                      torch.zeros_like(mass)).unsqueeze(-1)
    kt = acc[..., :D] * inv
    vt = acc[..., D:D + Dv] * inv
    log_mass = torch.where(nonempty, torch.log(torch.where(nonempty, mass, torch.ones_like(mass))) + m[..., :Ck],
                           torch.full_like(mass, float("-inf")))
    beta = log_mass - (kt * qbar.unsqueeze(2)).sum(-1)
    g = sigma = None
    if u is not None:
        ukt = (kt * u.unsqueeze(2)).sum(-1, keepdim=True)                 # u_a·k̃_aj
        g = acc[..., D + Dv:D + 2 * Dv] * inv - ukt * vt
        # the trust-region bound is a constant for the backward, like u and λ (and sqrt has no slope at 0)
        sigma = (acc[..., -1:] * inv - ukt * ukt).detach().clamp(min=0).sqrt().squeeze(-1)
    return Summaries(kt, vt, beta, g, sigma)


# ------------------------------------------------------------------------------ stage 2: summary attention


def summary_attention(qs, q_assign, summ: Summaries, qbar=None, u=None):
    """Stage 2: each query attends the C key summaries of its own query cluster.

    Args:
        qs: scaled queries ``[Z, N, D]``; q_assign: ``[Z, N]`` index into the A query clusters.
        summ: stage-1 summaries. qbar, u: ``[Z, A, D]`` centroids and directions (needed for the dipole).

    Returns:
        ``(out [Z, N, Dv], lse [Z, N], dip [Z, N, Dv] or None)``; a query whose summaries are all empty
        gets out = 0, lse = −inf.
    """
    Z, N, D = qs.shape
    A, Ck, Dv = summ.kt.shape[1], summ.kt.shape[2], summ.vt.shape[-1]
    step = max(1, _CHUNK_ELEMS // max(1, Z * Ck * max(D, Dv)))
    outs, lses, dips = [], [], []
    for s0 in range(0, N, step):
        s1 = min(N, s0 + step)
        a = q_assign[:, s0:s1]
        n = s1 - s0
        ia = a[:, :, None, None]
        kt = torch.gather(summ.kt, 1, ia.expand(Z, n, Ck, D))
        vt = torch.gather(summ.vt, 1, ia.expand(Z, n, Ck, Dv))
        beta = torch.gather(summ.beta, 1, a[:, :, None].expand(Z, n, Ck))
        q = qs[:, s0:s1]
        logits = torch.einsum("znd,zncd->znc", q, kt) + beta
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - _finite_or_zero(lse).unsqueeze(-1))
        outs.append(torch.einsum("znc,zncd->znd", p, vt))
        lses.append(lse)
        if summ.g is not None:
            g = torch.gather(summ.g, 1, ia.expand(Z, n, Ck, Dv))
            ua = torch.gather(u, 1, a[:, :, None].expand(Z, n, D))
            qa = torch.gather(qbar, 1, a[:, :, None].expand(Z, n, D))
            t = ((q - qa) * ua).sum(-1, keepdim=True)                   # [Z, n, 1]
            # trust region: the linearised tilt t shifts u·k's tilted mean by t·σ²; an outlying query
            # (large |t|) would extrapolate far past the cluster, so |t| is capped at DIPOLE_TRUST / σ_aj
            bound = DIPOLE_TRUST / torch.gather(summ.sigma, 1, a[:, :, None].expand(Z, n, Ck)).clamp(min=1e-30)
            tc = torch.maximum(torch.minimum(t, bound), -bound)            # [Z, n, Ck]
            dips.append(torch.einsum("znc,zncd->znd", p * tc, g))
    out = torch.cat(outs, 1)
    lse = torch.cat(lses, 1)
    return out, lse, (torch.cat(dips, 1) if dips else None)


# ----------------------------------------------------------------------------------- acausal block


def _query_centroids(q_fit, assign, mu):
    """Means of the members (with gradient); an empty cluster keeps its k-means centroid."""
    sums, counts = _segment_sum(q_fit, assign, mu.shape[-2])
    mean = sums / counts.clamp(min=1).unsqueeze(-1)
    return torch.where(counts.unsqueeze(-1) > 0, mean, mu), counts


@torch.no_grad()
def _dipole_directions(q_fit, assign, qbar):
    """Unit main direction of the offsets ``q − q̄_a`` in each query cluster (power iteration)."""
    *lead, L, D = q_fit.shape
    C = qbar.shape[-2]
    delta = q_fit - torch.gather(qbar, -2, assign.unsqueeze(-1).expand(*lead, L, D))
    # a fixed, non-symmetric start vector; power iteration on Σ δδᵀ without forming it
    u = torch.linspace(1.0, 2.0, D, dtype=q_fit.dtype, device=q_fit.device).expand(*lead, C, D)
    u = u / u.norm(dim=-1, keepdim=True)
    for _ in range(POWER_ITERS):
        ua = torch.gather(u, -2, assign.unsqueeze(-1).expand(*lead, L, D))
        proj = (delta * ua).sum(-1, keepdim=True)
        nu = delta.new_zeros(*lead, C, D).scatter_add(-2, assign.unsqueeze(-1).expand(*lead, L, D), delta * proj)
        norm = nu.norm(dim=-1, keepdim=True)
        u = torch.where(norm > 0, nu / norm.clamp(min=torch.finfo(nu.dtype).tiny), u)
    return u


def muse_block(qs, k, v, *, query_clusters, key_clusters, kmeans_iters, dipole, key_valid=None, q_fit=None):
    """Acausal MuSe for a batch of independent problems (the core of both the acausal and causal paths).

    Args:
        qs: scaled queries ``[Z, G, N, D]`` (G query heads share each key/value head).
        k, v: ``[Z, M, D]``, ``[Z, M, Dv]``; key_valid: optional bool ``[Z, M]``.
        q_fit: optional ``[Z, G, Nf, D]``: queries that define the query clusters, tilt points, dipole
            directions and λ (default: ``qs`` itself). The causal path passes earlier queries here.

    Returns:
        ``(out [Z, G, N, Dv], lse [Z, G, N])``.
    """
    Z, G, N, D = qs.shape
    M, Dv = k.shape[1], v.shape[-1]
    same = q_fit is None
    q_fit = qs if same else q_fit
    Nf = q_fit.shape[2]
    Cq = min(query_clusters, Nf)
    Ck = min(key_clusters, M)

    fit_assign, mu = kmeans(q_fit, Cq, kmeans_iters)                     # [Z, G, Nf]
    key_assign, _ = kmeans(k, Ck, kmeans_iters, valid=key_valid)         # [Z, M]
    qbar, _ = _query_centroids(q_fit, fit_assign, mu)                    # [Z, G, Cq, D]
    if same:
        q_assign = fit_assign
    else:
        with torch.no_grad():
            qb = qbar.detach()
            q_assign = (qs @ qb.transpose(-1, -2) - 0.5 * (qb * qb).sum(-1).unsqueeze(-2)).argmax(-1)
    u = _dipole_directions(q_fit.detach(), fit_assign, qbar.detach()) if dipole else None

    A = G * Cq
    offset = (torch.arange(G, device=qs.device) * Cq).view(1, G, 1)
    flat = lambda t: t.reshape(Z, A, t.shape[-1])                       # noqa: E731
    summ = tilted_summaries(flat(qbar), k, v, key_assign, Ck, u=None if u is None else flat(u))
    out, lse, dip = summary_attention(qs.reshape(Z, G * N, D), (q_assign + offset).reshape(Z, G * N), summ,
                                      qbar=flat(qbar), u=None if u is None else flat(u))
    out, lse = out.view(Z, G, N, Dv), lse.view(Z, G, N)
    if dip is not None:
        lam = _dipole_scale(q_fit, fit_assign + offset, k, v, key_valid, summ, flat(qbar), flat(u))
        out = out + lam.view(Z, G, 1, 1) * dip.view(Z, G, N, Dv)
    return out, lse


@torch.no_grad()
def _dipole_scale(q_fit, fit_assign, k, v, key_valid, summ, qbar, u):
    """λ ∈ [0, 1] per (problem, head): least-squares scale of the dipole term on sample queries.

    On the samples, ``‖mono + λ·dip − exact‖² <= ‖mono − exact‖²`` holds by construction (λ = 0 is a
    candidate and the quadratic's minimiser over [0, 1] is taken).
    """
    Z, G, Nf, D = q_fit.shape
    S = min(Nf, GUARD_SAMPLES)
    pos = guard_sample_index(Nf, S, q_fit.device)
    qsamp = q_fit[:, :, pos]                                              # [Z, G, S, D]
    asamp = fit_assign[:, :, pos]
    mono, _, dip = summary_attention(qsamp.reshape(Z, G * S, D), asamp.reshape(Z, G * S), summ, qbar=qbar, u=u)
    logits = torch.einsum("zgsd,zmd->zgsm", qsamp, k)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, -1, keepdim=True)
    exact = torch.einsum("zgsm,zmd->zgsd", torch.exp(logits - _finite_or_zero(lse)), v)
    mono, dip = mono.view_as(exact), dip.view_as(exact)
    num = (dip * (exact - mono)).sum((-2, -1))
    den = (dip * dip).sum((-2, -1))
    lam = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return lam.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------- causal


def merge_partials(o1, lse1, o2, lse2):
    """Combine two normalised partial attentions over disjoint key sets by their log-sum-exps."""
    lse = torch.logaddexp(lse1, lse2)
    safe = _finite_or_zero(lse)
    w1 = torch.where(torch.isfinite(lse1), torch.exp(lse1 - safe), torch.zeros_like(lse1))
    w2 = torch.where(torch.isfinite(lse2), torch.exp(lse2 - safe), torch.zeros_like(lse2))
    return o1 * w1.unsqueeze(-1) + o2 * w2.unsqueeze(-1), lse


def _exact_pairs(qs, k, v, key_valid, causal):
    """Exact attention for small batched blocks: qs [Z, G, n, D], k [Z, m, D]; causal = diagonal mask."""
    logits = torch.einsum("zgnd,zmd->zgnm", qs, k)
    n, m = qs.shape[2], k.shape[1]
    allowed = torch.ones(n, m, dtype=torch.bool, device=qs.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.view(1, 1, n, m)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - _finite_or_zero(lse).unsqueeze(-1))
    return torch.einsum("zgnm,zmd->zgnd", p, v), lse


def _causal(qs, k, v, key_valid, *, query_clusters, key_clusters, kmeans_iters, dipole, block_size):
    """Causal MuSe: qs [Z, G, N, D], k [Z, N, D], v [Z, N, Dv]."""
    Z, G, N, D = qs.shape
    Dv = v.shape[-1]
    b = block_size
    nb = -(-N // b)
    pad = nb * b - N

    def padded(t, dim):
        if pad == 0:
            return t
        shape = list(t.shape)
        shape[dim] = pad
        return torch.cat([t, t.new_zeros(shape)], dim=dim)

    # exact local blocks (padding keys sit after every real query, so the causal mask hides them)
    qb = padded(qs, 2).view(Z, G, nb, b, D).permute(0, 2, 1, 3, 4).reshape(Z * nb, G, b, D)
    kb = padded(k, 1).reshape(Z * nb, b, D)
    vb = padded(v, 1).reshape(Z * nb, b, Dv)
    kvb = None if key_valid is None else padded(key_valid, 1).reshape(Z * nb, b)
    o, lse = _exact_pairs(qb, kb, vb, kvb, causal=True)
    out = o.view(Z, nb, G, b, Dv).permute(0, 2, 1, 3, 4).reshape(Z, G, nb * b, Dv)[:, :, :N]
    lse = lse.view(Z, nb, G, b).permute(0, 2, 1, 3).reshape(Z, G, nb * b)[:, :, :N]

    for level in causal_schedule(N, b, max(query_clusters, key_clusters)):
        S = level.segment
        pieces = []   # (start of right segment, count of pairs, right length)
        if level.full_pairs:
            pieces.append((0, level.full_pairs, S))
        if level.tail:
            pieces.append((2 * S * level.full_pairs, 1, level.tail))
        lo, lp = [], []
        for start, P, R in pieces:
            span = 2 * S * P if R == S else S + R
            qr = qs[:, :, start:start + span]
            kr, vr = k[:, start:start + span], v[:, start:start + span]
            kvr = None if key_valid is None else key_valid[:, start:start + span]
            if R == S:
                q2 = qr.reshape(Z, G, P, 2, S, D).permute(0, 2, 1, 3, 4, 5).reshape(Z * P, G, 2, S, D)
                qL, qR = q2[:, :, 0], q2[:, :, 1]
                kL = kr.reshape(Z * P, 2, S, D)[:, 0]
                vL = vr.reshape(Z * P, 2, S, Dv)[:, 0]
                mL = None if kvr is None else kvr.reshape(Z * P, 2, S)[:, 0]
            else:
                qL, qR = qr[:, :, :S], qr[:, :, S:]
                kL, vL = kr[:, :S], vr[:, :S]
                mL = None if kvr is None else kvr[:, :S]
            if level.exact:
                o_r, l_r = _exact_pairs(qR, kL, vL, mL, causal=False)
            else:
                o_r, l_r = muse_block(qR, kL, vL, query_clusters=query_clusters, key_clusters=key_clusters,
                                      kmeans_iters=kmeans_iters, dipole=dipole, key_valid=mL, q_fit=qL)
            # place right-segment results at their positions; left segments get an empty partial
            if R == S:
                o_r = o_r.view(Z, P, G, S, Dv).permute(0, 2, 1, 3, 4)
                l_r = l_r.view(Z, P, G, S).permute(0, 2, 1, 3)
                o_full = torch.stack([torch.zeros_like(o_r), o_r], 3).reshape(Z, G, 2 * S * P, Dv)
                l_full = torch.stack([torch.full_like(l_r, float("-inf")), l_r], 3).reshape(Z, G, 2 * S * P)
            else:
                o_full = torch.cat([o_r.new_zeros(Z, G, S, Dv), o_r], 2)
                l_full = torch.cat([l_r.new_full((Z, G, S), float("-inf")), l_r], 2)
            lo.append(o_full)
            lp.append(l_full)
        o_lvl = torch.cat(lo, 2)
        l_lvl = torch.cat(lp, 2)
        rest = N - o_lvl.shape[2]
        if rest:
            o_lvl = torch.cat([o_lvl, o_lvl.new_zeros(Z, G, rest, Dv)], 2)
            l_lvl = torch.cat([l_lvl, l_lvl.new_full((Z, G, rest), float("-inf"))], 2)
        out, lse = merge_partials(out, lse, o_lvl, l_lvl)
    return out, lse


# --------------------------------------------------------------------------------------------- entry


def muse_attention(q, k, v, *, causal=False, scale=None, clusters=128, query_clusters=None, dipole=True,
                   kmeans_iters=2, block_size=256, key_padding_mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole MuSe op in PyTorch. Arguments as :func:`muse_compile.multipole_attention` (validated there).

    Returns:
        ``(out [B, H, N, Dv] in q's dtype, lse [B, H, N] in the compute dtype)``.
    """
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    cdt = _compute_dtype(q.dtype)
    s = D ** -0.5 if scale is None else float(scale)
    qs = (q.to(cdt) * s).reshape(B * Hkv, G, N, D)
    kf = k.to(cdt).reshape(B * Hkv, M, D)
    vf = v.to(cdt).reshape(B * Hkv, M, Dv)
    key_valid = None
    if key_padding_mask is not None:
        key_valid = key_padding_mask[:, None, :].expand(B, Hkv, M).reshape(B * Hkv, M)
    qc = clusters if query_clusters is None else query_clusters
    if causal:
        out, lse = _causal(qs, kf, vf, key_valid, query_clusters=qc, key_clusters=clusters,
                           kmeans_iters=kmeans_iters, dipole=dipole, block_size=block_size)
    else:
        out, lse = muse_block(qs, kf, vf, query_clusters=qc, key_clusters=clusters, kmeans_iters=kmeans_iters,
                              dipole=dipole, key_valid=key_valid)
    return out.reshape(B, H, N, Dv).to(q.dtype), lse.reshape(B, H, N)
