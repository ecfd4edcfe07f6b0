"""The custom ops the pass inserts: ``torch.ops.muse.attention`` and its backward.

Both are ``torch.library.custom_op`` (opaque to Dynamo, AOTAutograd and Inductor, which emit one extern
call). ``muse::attention`` takes q/k/v, an optional ``[B, M]`` bool key-padding mask (True = keep), the
policy numbers and ``min_context``: below that key length it computes exact attention at run time, so a
graph compiled with ``dynamic=True`` serves lengths on both sides of the threshold. Which implementation
runs is decided in :mod:`muse_compile.dispatch` only.

Autograd: ``muse::attention_backward`` (also a custom op, so traced graphs keep it as one node) recomputes
the forward with the differentiable reference and differentiates it, unless the Triton path ships its
own backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import dispatch

__all__ = ["attention", "attention_backward", "call_attention"]


@torch.library.custom_op("muse::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
              scale: Optional[float], clusters: int, query_clusters: Optional[int], dipole: bool,
              kmeans_iters: int, block_size: int, min_context: int, impl: str) -> Tensor:
    """MuSe attention ``[B, H, N, D] x [B, Hkv, M, D] x [B, Hkv, M, Dv] -> [B, H, N, Dv]``."""
    out = dispatch.attention_forward(
        q, k, v, key_padding_mask, causal=causal, scale=scale, clusters=clusters,
        query_clusters=query_clusters, dipole=dipole, kmeans_iters=kmeans_iters, block_size=block_size,
        min_context=min_context, impl=impl)
    return out.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, key_padding_mask, causal, scale, clusters, query_clusters, dipole,
                    kmeans_iters, block_size, min_context, impl):
    B, H, N, _ = q.shape
    return q.new_empty((B, H, N, v.shape[-1]))


@torch.library.custom_op("muse::attention_backward", mutates_args=())
def attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                       causal: bool, scale: Optional[float], clusters: int, query_clusters: Optional[int],
                       dipole: bool, kmeans_iters: int, block_size: int, min_context: int,
                       impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``muse::attention`` with respect to q, k, v."""
    dq, dk, dv = dispatch.attention_backward(
        grad.contiguous(), q, k, v, key_padding_mask, causal=causal, scale=scale, clusters=clusters,
        query_clusters=query_clusters, dipole=dipole, kmeans_iters=kmeans_iters, block_size=block_size,
        min_context=min_context, impl=impl)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _attention_backward_fake(grad, q, k, v, key_padding_mask, causal, scale, clusters, query_clusters, dipole,
                             kmeans_iters, block_size, min_context, impl):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


_PARAMS = ("causal", "scale", "clusters", "query_clusters", "dipole", "kmeans_iters", "block_size",
           "min_context", "impl")


def _setup_context(ctx, inputs, output):
    q, k, v, kpm = inputs[:4]
    ctx.save_for_backward(q, k, v, kpm)
    ctx.params = dict(zip(_PARAMS, inputs[4:]))


def _backward(ctx, grad):
    q, k, v, kpm = ctx.saved_tensors
    p = ctx.params
    dq, dk, dv = torch.ops.muse.attention_backward(
        grad, q, k, v, kpm, p["causal"], p["scale"], p["clusters"], p["query_clusters"], p["dipole"],
        p["kmeans_iters"], p["block_size"], p["min_context"], p["impl"])
    return (dq, dk, dv) + (None,) * (1 + len(_PARAMS))


attention.register_autograd(_backward, setup_context=_setup_context)


def call_attention(q, k, v, key_padding_mask=None, *, causal=False, scale=None, clusters=128,
                   query_clusters=None, dipole=True, kmeans_iters=2, block_size=256, min_context=0,
                   impl="auto") -> Tensor:
    """Keyword-friendly wrapper around ``torch.ops.muse.attention``."""
    return torch.ops.muse.attention(
        q, k, v, key_padding_mask, bool(causal), None if scale is None else float(scale), int(clusters),
        None if query_clusters is None else int(query_clusters), bool(dipole), int(kmeans_iters),
        int(block_size), int(min_context), str(impl))
