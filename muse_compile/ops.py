"""The custom ops the pass inserts: ``torch.ops.muse.attention`` and its backward.

Both are ``torch.library.custom_op`` (opaque to Dynamo, AOTAutograd and Inductor, which emit one extern
call). ``muse::attention`` takes q/k/v, an optional ``[B, M]`` bool key-padding mask (True = keep), the
policy numbers and ``min_context``: below that key length it computes exact attention at run time, so a
graph compiled with ``dynamic=True`` serves lengths on both sides of the threshold. Which implementation
runs is decided in :mod:`muse_compile.dispatch` only.

The op returns ``(out, state)``: graphs use ``out``; autograd saves ``state`` (what the Triton backward
needs of this call's forward: clustering, summaries, log-sum-exp), so training does not run the forward
twice. ``muse::attention_backward`` (also a custom op, so traced graphs keep it as one node) runs the Triton
backward on that state, or recomputes the forward with the differentiable reference and differentiates it
where the call ran the reference (or exact attention below ``min_context``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import dispatch

__all__ = ["attention", "attention_backward", "call_attention", "static_shapes"]


@torch.library.custom_op("muse::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
              scale: Optional[float], clusters: int, query_clusters: Optional[int], dipole: bool,
              kmeans_iters: int, block_size: int, min_context: int, impl: str,
              keep_state: bool) -> Tuple[Tensor, Tensor]:
    """MuSe attention ``[B, H, N, D] x [B, Hkv, M, D] x [B, Hkv, M, Dv] -> ([B, H, N, Dv], state)``.

    ``state`` is a 1-D uint8 tensor the backward reads (the Triton path's clustering, summaries and
    log-sum-exp, ``KernelPlan.state_layout``); empty where the call ran exact attention or the reference,
    or with ``keep_state=False``. Graphs use element 0 only; autograd saves the state, so the backward does
    not re-run the forward. The state's size follows the shapes through the plan (the causal level schedule,
    the ``min_context`` switch), so a graph traced with symbolic shapes passes ``keep_state=False`` (its
    backward re-runs the forward kernels)."""
    res = dispatch.attention_forward(
        q, k, v, key_padding_mask, causal=causal, scale=scale, clusters=clusters,
        query_clusters=query_clusters, dipole=dipole, kmeans_iters=kmeans_iters, block_size=block_size,
        min_context=min_context, impl=impl, with_state=keep_state)
    out, state = res if keep_state else (res, q.new_empty((0,), dtype=torch.uint8))
    return out.contiguous(), state


@attention.register_fake
def _attention_fake(q, k, v, key_padding_mask, causal, scale, clusters, query_clusters, dipole,
                    kmeans_iters, block_size, min_context, impl, keep_state):
    B, H, N, _ = q.shape
    n = 0
    if keep_state:
        n = dispatch.state_bytes(q, k, v, key_padding_mask, causal=causal, scale=scale, clusters=clusters,
                                 query_clusters=query_clusters, dipole=dipole, kmeans_iters=kmeans_iters,
                                 block_size=block_size, min_context=min_context, impl=impl)
        if n is None:   # symbolic shapes: the size is only known when the call runs
            n = torch.library.get_ctx().new_dynamic_size()
    return q.new_empty((B, H, N, v.shape[-1])), q.new_empty((n,), dtype=torch.uint8)


@torch.library.custom_op("muse::attention_backward", mutates_args=())
def attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                       out: Optional[Tensor], state: Tensor, causal: bool, scale: Optional[float],
                       clusters: int, query_clusters: Optional[int], dipole: bool, kmeans_iters: int,
                       block_size: int, min_context: int, impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``muse::attention`` with respect to q, k, v (``out``, ``state``: the forward's outputs;
    ``out`` may be None for the acausal op)."""
    dq, dk, dv = dispatch.attention_backward(
        grad.contiguous(), q, k, v, key_padding_mask, out=out, state=state, causal=causal, scale=scale,
        clusters=clusters, query_clusters=query_clusters, dipole=dipole, kmeans_iters=kmeans_iters,
        block_size=block_size, min_context=min_context, impl=impl)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _attention_backward_fake(grad, q, k, v, key_padding_mask, out, state, causal, scale, clusters,
                             query_clusters, dipole, kmeans_iters, block_size, min_context, impl):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


_PARAMS = ("causal", "scale", "clusters", "query_clusters", "dipole", "kmeans_iters", "block_size",
           "min_context", "impl")     # the forward's arguments after q, k, v, mask (then keep_state)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm = inputs[:4]
    out, state = output
    ctx.params = dict(zip(_PARAMS, inputs[4:4 + len(_PARAMS)]))
    # the causal backward needs the output (D = dO·o); the acausal one does not
    ctx.save_for_backward(q, k, v, kpm, out if ctx.params["causal"] else None, state)


def _backward(ctx, grad, _grad_state):
    q, k, v, kpm, out, state = ctx.saved_tensors
    p = ctx.params
    dq, dk, dv = torch.ops.muse.attention_backward(
        grad, q, k, v, kpm, out, state, p["causal"], p["scale"], p["clusters"], p["query_clusters"],
        p["dipole"], p["kmeans_iters"], p["block_size"], p["min_context"], p["impl"])
    return (dq, dk, dv) + (None,) * (2 + len(_PARAMS))


attention.register_autograd(_backward, setup_context=_setup_context)


def call_attention(q, k, v, key_padding_mask=None, *, causal=False, scale=None, clusters=128,
                   query_clusters=None, dipole=True, kmeans_iters=2, block_size=256, min_context=0,
                   impl="auto") -> Tensor:
    """Keyword-friendly wrapper around ``torch.ops.muse.attention``: the output only.

    Eager calls keep the state for the backward. While Dynamo traces a call it cannot be told whether the
    shapes are symbolic (``isinstance(d, torch.SymInt)`` is False there), so traced calls pass
    ``keep_state=False`` and their backward re-runs the forward; ``muse_compile.optimize`` rewrites graphs
    after tracing, where the shapes are known, and keeps the state whenever they are static."""
    keep = static_shapes(q, k, v) and not torch.compiler.is_dynamo_compiling()
    return torch.ops.muse.attention(
        q, k, v, key_padding_mask, bool(causal), None if scale is None else float(scale), int(clusters),
        None if query_clusters is None else int(query_clusters), bool(dipole), int(kmeans_iters),
        int(block_size), int(min_context), str(impl), keep)[0]


def static_shapes(*tensors) -> bool:
    """True unless a tensor's shape is symbolic (a graph traced with dynamic shapes) or unknown (None): the
    ``keep_state`` argument of ``muse::attention``."""
    from ._compat import is_symbolic
    return all(isinstance(t, Tensor) for t in tensors) and not any(is_symbolic(d) for t in tensors for d in t.shape)
