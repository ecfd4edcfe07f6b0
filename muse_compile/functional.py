"""``multipole_attention``: the MuSe op as a plain function, usable without the compiler."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["multipole_attention", "validate_attention_args"]

_IMPLS = ("auto", "triton", "reference")


def validate_attention_args(q, k, v, *, causal, scale, clusters, query_clusters, kmeans_iters, block_size,
                            key_padding_mask=None, impl="auto") -> None:
    """Raise ``ValueError`` naming the problem for any input MuSe cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, N, D = q.shape
    Bk, Hkv, M, Dk = k.shape
    Bv, Hv, Mv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Hv != Hkv:
        raise ValueError(f"k and v must have the same number of heads, got {Hkv} and {Hv}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if Dk != D:
        raise ValueError(f"q and k head dims differ: {D} vs {Dk}")
    if Mv != M:
        raise ValueError(f"k and v sequence lengths differ: {M} vs {Mv}")
    if D < 1 or Dv < 1:
        raise ValueError(f"head dims must be >= 1, got D={D}, Dv={Dv}")
    if N < 1 or M < 1:
        raise ValueError(f"sequence lengths must be >= 1, got N={N}, M={M}")
    if causal and N != M:
        raise ValueError(f"causal attention needs equal query and key lengths, got N={N}, M={M}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number or None, got {type(scale).__name__}")

    def _int(name, val, lo):
        if isinstance(val, bool) or not isinstance(val, int):
            raise ValueError(f"{name} must be an int, got {val!r}")
        if val < lo:
            raise ValueError(f"{name} must be >= {lo}, got {val}")

    _int("clusters", clusters, 1)
    if query_clusters is not None:
        _int("query_clusters", query_clusters, 1)
    _int("kmeans_iters", kmeans_iters, 0)
    _int("block_size", block_size, 1)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor [B, M] (True = keep)")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(f"key_padding_mask must have shape [B, M] = {(B, M)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def multipole_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    clusters: int = 128,
    query_clusters: Optional[int] = None,
    dipole: bool = True,
    kmeans_iters: int = 2,
    block_size: int = 256,
    key_padding_mask: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> torch.Tensor:
    r"""Multipole Semantic Attention: an O(N·C·D) approximation of softmax attention.

    Computes ``softmax(scale * q @ k.T) @ v`` approximately (see ``docs/algorithm.md``): queries and keys
    are clustered separately per (batch, head); each query attends to exponentially tilted summaries of
    the key clusters, taken at its own query cluster's centroid, plus a guarded dipole correction.
    ``causal=True`` uses exact local blocks of ``block_size`` plus dyadic acausal levels merged by
    log-sum-exp; no output depends on a later position.

    Args:
        q: queries ``[B, H, N, D]``.
        k: keys ``[B, Hkv, M, D]`` with ``H % Hkv == 0`` (grouped-query attention when ``Hkv < H``).
        v: values ``[B, Hkv, M, Dv]``.
        causal: causal attention (needs ``N == M``; query i sees keys ``<= i``).
        scale: logit scale; default ``D ** -0.5``.
        clusters: key clusters per (batch, head), and query clusters unless ``query_clusters`` is set.
            With ``clusters >= max(N, M)`` the result equals exact attention to float tolerance.
        query_clusters: query clusters, if different from ``clusters``.
        dipole: add the dipole correction (scaled per head so it never raises the error on a sample of
            queries checked against exact attention).
        kmeans_iters: Lloyd iterations of each clustering.
        block_size: exact local block of causal attention.
        key_padding_mask: optional bool ``[B, M]``, True = attend; masked keys take part in nothing.
            A query with no key left returns zeros.
        impl: ``"auto"`` (Triton on CUDA when the shape is supported, else the reference), ``"triton"``
            or ``"reference"``.

    Returns:
        ``[B, H, N, Dv]`` in the dtype of ``q`` (accumulation in float32, or float64 for float64 input).

    Example::

        >>> q = torch.randn(1, 4, 1024, 64); k = torch.randn(1, 2, 1024, 64); v = torch.randn(1, 2, 1024, 64)
        >>> multipole_attention(q, k, v, clusters=32).shape
        torch.Size([1, 4, 1024, 64])
    """
    validate_attention_args(q, k, v, causal=causal, scale=scale, clusters=clusters,
                            query_clusters=query_clusters, kmeans_iters=kmeans_iters,
                            block_size=block_size, key_padding_mask=key_padding_mask, impl=impl)
    from muse_compile.ops import call_attention

    return call_attention(q, k, v, key_padding_mask, causal=causal, scale=scale, clusters=clusters,
                          query_clusters=query_clusters, dipole=dipole, kmeans_iters=kmeans_iters,
                          block_size=block_size, min_context=0, impl=impl)
