"""Plain functions the rewriter inserts into graphs (traced through by AOTAutograd / Inductor)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .ops import static_shapes

__all__ = ["key_padding_from_masks", "mha_forward"]


def key_padding_from_masks(k: torch.Tensor, kinds: Sequence[str], *masks: torch.Tensor) -> torch.Tensor:
    """The ``[B, M]`` keep-mask (True = attend) of masks proven to be ``base & keep[b, j]``.

    Reads each mask's last query row of its first head (under a causal base every key is visible from the
    last row), so only one row of a broadcast mask is ever computed after fusion. ``kinds``: ``"keep"``
    (bool, True = attend), ``"drop"`` (bool, True = excluded), ``"add"`` (additive, 0 = attend).
    """
    B, M = k.shape[0], k.shape[2]
    keep: Optional[torch.Tensor] = None
    for kind, m in zip(kinds, masks):
        if kind == "keep":
            a = m
        elif kind == "drop":
            a = ~m
        elif kind == "add":
            a = m == 0
        else:  # pragma: no cover
            raise ValueError(kind)
        while a.dim() < 4:
            a = a.unsqueeze(0)
        row = a[:, 0, -1, :].expand(B, M)
        keep = row if keep is None else keep & row
    assert keep is not None
    return keep.contiguous()


def mha_forward(query, key, value, num_heads: int, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                use_separate_proj_weight: bool, q_proj_weight, k_proj_weight, v_proj_weight, key_padding_mask,
                causal: bool, clusters: int, query_clusters, dipole: bool, kmeans_iters: int, block_size: int,
                min_context: int, impl: str):
    """``F.multi_head_attention_forward`` (seq-first ``[L, B, E]``, no bias_k/v, no zero-attn, no dropout)
    with the attention itself as ``torch.ops.muse.attention``. Returns ``(out, None)``."""
    L, B, E = query.shape
    S = key.shape[0]
    Dh = E // num_heads
    if use_separate_proj_weight:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        wq, wk, wv = in_proj_weight.chunk(3)
    if in_proj_bias is not None:
        bq, bk, bv = in_proj_bias.chunk(3)
    else:
        bq = bk = bv = None
    q = F.linear(query, wq, bq).view(L, B, num_heads, Dh).permute(1, 2, 0, 3)
    k = F.linear(key, wk, bk).view(S, B, num_heads, Dh).permute(1, 2, 0, 3)
    v = F.linear(value, wv, bv).view(S, B, num_heads, Dh).permute(1, 2, 0, 3)
    if key_padding_mask is None:
        keep = None
    elif key_padding_mask.dtype == torch.bool:
        keep = ~key_padding_mask                  # PyTorch convention: True = ignore
    else:
        keep = key_padding_mask == 0              # additive 0 / -inf (proven by the matcher)
    o = torch.ops.muse.attention(q, k, v, keep, causal, None, clusters, query_clusters, dipole, kmeans_iters,
                                 block_size, min_context, impl, static_shapes(q, k, v))[0]
    o = o.permute(2, 0, 1, 3).reshape(L, B, E)
    return F.linear(o, out_proj_weight, out_proj_bias), None
