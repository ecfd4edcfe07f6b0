"""The one place that decides which implementation computes an attention call.

``torch.ops.muse.attention`` (and so ``multipole_attention`` and every rewritten graph) ends here:

* key length ``M < min_context`` -> exact attention (the run-time side of the policy threshold, so one
  graph compiled with ``dynamic=True`` serves lengths on both sides of it);
* ``impl="reference"`` -> the PyTorch reference (``muse_compile.kernels.reference``);
* ``impl="triton"`` -> the Triton path (``muse_compile.kernels.triton_muse``); a clear error when it is
  missing or refuses the shape;
* ``impl="auto"`` -> Triton on CUDA when the module exists and ``lowering.plan.supports`` accepts the
  call, otherwise the reference; the reason is kept in :data:`last_choice` and logged at DEBUG level.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["attention_forward", "attention_backward", "state_bytes", "resolve_impl", "last_choice", "TritonUnavailable"]

log = logging.getLogger("muse_compile")

#: (impl name, reason) of the most recent approximate call on this process (for reports and debugging).
last_choice: Tuple[str, str] = ("", "")


class TritonUnavailable(RuntimeError):
    """``impl="triton"`` was asked for but the Triton path cannot run this call."""


def _triton_modules():
    """(triton_muse module or None, plan module or None, why-not string)."""
    try:
        from muse_compile.kernels import triton_muse  # noqa: WPS433 (lazy on purpose)
    except Exception as e:  # ImportError, or triton itself failing to import
        return None, None, f"muse_compile.kernels.triton_muse unavailable ({type(e).__name__}: {e})"
    try:
        from muse_compile.lowering import plan
    except Exception as e:
        return triton_muse, None, f"muse_compile.lowering.plan unavailable ({type(e).__name__}: {e})"
    return triton_muse, plan, ""


def _supports(plan, q, k, v, causal, key_padding_mask, plan_kw=None) -> Tuple[bool, str]:
    ok, reason = plan.supports(q, k, v, causal=causal, key_padding_mask=key_padding_mask, **(plan_kw or {}))
    return bool(ok), str(reason)


def resolve_impl(q, k, v, *, causal: bool, key_padding_mask: Optional[torch.Tensor], impl: str,
                 **plan_kw) -> Tuple[str, str]:
    """Which implementation runs the approximate path: ``("reference" | "triton", reason)``.

    ``plan_kw`` (clusters, query_clusters, block_size, ...) are passed on to ``lowering.plan.supports``."""
    if impl == "reference":
        return "reference", "impl='reference'"
    if impl == "triton":
        mod, plan, why = _triton_modules()
        if mod is None or plan is None:
            raise TritonUnavailable(f"impl='triton' requested but {why}")
        ok, reason = _supports(plan, q, k, v, causal, key_padding_mask, plan_kw)
        if not ok:
            raise TritonUnavailable(f"impl='triton' requested but the Triton plan refuses this call: {reason}")
        return "triton", "impl='triton'"
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if not q.is_cuda:
        return "reference", f"impl='auto' on {q.device.type}: reference"
    mod, plan, why = _triton_modules()
    if mod is None or plan is None:
        return "reference", f"impl='auto': {why}; reference"
    ok, reason = _supports(plan, q, k, v, causal, key_padding_mask, plan_kw)
    if not ok:
        return "reference", f"impl='auto': Triton plan refuses ({reason}); reference"
    return "triton", "impl='auto': Triton"


def exact(q, k, v, *, causal, scale, key_padding_mask):
    """Exact softmax attention (differentiable). Fully masked query rows give zeros, as the reference."""
    H, Hkv = q.shape[1], k.shape[1]
    if key_padding_mask is None:
        kw = {"enable_gqa": True} if H != Hkv else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kw)
    from muse_compile.kernels import reference
    return reference.exact_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)


def _no_state(q):
    return q.new_empty((0,), dtype=torch.uint8)


def attention_forward(q, k, v, key_padding_mask, *, causal, scale, clusters, query_clusters, dipole,
                      kmeans_iters, block_size, min_context, impl, _for_backward=False, with_state=False):
    """The forward of ``torch.ops.muse.attention``: exact below ``min_context``, else MuSe by ``impl``.

    ``with_state=True`` returns ``(out, state)``: the Triton path's state for the backward (see
    :func:`state_bytes`), an empty uint8 tensor for exact attention and the reference."""
    global last_choice
    if k.shape[2] < min_context:
        out = exact(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
        return (out, _no_state(q)) if with_state else out
    kwargs = dict(causal=causal, scale=scale, clusters=clusters, query_clusters=query_clusters, dipole=dipole,
                  kmeans_iters=kmeans_iters, block_size=block_size, key_padding_mask=key_padding_mask)
    plan_kw = dict(clusters=clusters, query_clusters=query_clusters, dipole=dipole, kmeans_iters=kmeans_iters,
                   block_size=block_size, scale=scale)
    name, reason = resolve_impl(q, k, v, causal=causal, key_padding_mask=key_padding_mask, impl=impl, **plan_kw)
    if last_choice != (name, reason):
        log.debug("muse attention impl: %s (%s)", name, reason)
    last_choice = (name, reason)
    if name == "triton" and not _for_backward:
        mod, _, _ = _triton_modules()
        keep = with_state and _triton_backward_applies(mod, q, k, v, kwargs)
        res = mod.muse_attention(q, k, v, return_state=keep, **kwargs)
        if not with_state:
            return res[0]
        return res[0], (res[2] if keep else _no_state(q))
    from muse_compile.kernels import reference
    out, _ = reference.muse_attention(q, k, v, **kwargs)
    return (out, _no_state(q)) if with_state else out


def state_bytes(q, k, v, key_padding_mask, *, causal, scale, clusters, query_clusters, dipole, kmeans_iters,
                block_size, min_context, impl) -> Optional[int]:
    """Size of the state :func:`attention_forward` returns for these (possibly fake) inputs: the Triton plan's
    ``state_bytes``, 0 where the call runs exact attention or the reference or where the Triton backward
    would not take it, None when it depends on symbolic shapes (the op's fake kernel then makes an unbacked
    size)."""
    from ._compat import is_symbolic
    if any(is_symbolic(d) for t in (q, k, v) for d in t.shape):
        return None
    if k.shape[2] < min_context:
        return 0
    name, _ = resolve_impl(q, k, v, causal=causal, key_padding_mask=key_padding_mask, impl=impl,
                           clusters=clusters, query_clusters=query_clusters, dipole=dipole,
                           kmeans_iters=kmeans_iters, block_size=block_size, scale=scale)
    if name != "triton":
        return 0
    mod, _, _ = _triton_modules()
    kw = dict(causal=causal, clusters=clusters, query_clusters=query_clusters, dipole=dipole,
              kmeans_iters=kmeans_iters, block_size=block_size, key_padding_mask=key_padding_mask)
    if not _triton_backward_applies(mod, q, k, v, kw):
        return 0
    return mod.make_plan(q, k, v, causal=causal, clusters=clusters, query_clusters=query_clusters, dipole=dipole,
                         kmeans_iters=kmeans_iters, block_size=block_size,
                         key_padding_mask=key_padding_mask).state_bytes


def _triton_backward_applies(mod, q, k, v, kw) -> bool:
    """Whether the Triton backward would take a call the Triton forward runs (else the state is not kept:
    the reference recompute would not read it)."""
    kw = {x: y for x, y in kw.items() if x != "scale"}
    return (not q.is_cuda or mod.BACKWARD_ON_GPU) and mod.backward_supported(q, k, v, **kw)


def attention_backward(grad, q, k, v, key_padding_mask, *, out=None, state=None, **params):
    """Gradients ``(dq, dk, dv)`` of :func:`attention_forward`.

    Uses the Triton backward (``triton_muse.muse_attention_backward``) when the forward ran on Triton and
    the backward takes the call (``triton_muse.backward_supported``; on CUDA once it has been validated
    there: ``triton_muse.BACKWARD_ON_GPU``), on the forward's ``state`` (and ``out``, causal) where given
    and non-empty; otherwise recomputes the forward with the (differentiable) reference under
    ``torch.enable_grad()`` and differentiates it.
    """
    min_context, impl = params["min_context"], params["impl"]
    if k.shape[2] >= min_context:
        plan_kw = {k_: v_ for k_, v_ in params.items() if k_ not in ("min_context", "impl", "causal")}
        name, _ = resolve_impl(q, k, v, causal=params["causal"], key_padding_mask=key_padding_mask, impl=impl,
                               **plan_kw)
        if name == "triton":
            mod, _, _ = _triton_modules()
            kw = {k_: v_ for k_, v_ in params.items() if k_ not in ("min_context", "impl")}
            if _triton_backward_applies(mod, q, k, v, dict(kw, key_padding_mask=key_padding_mask)):
                saved = (out, state) if state is not None and state.numel() > 0 else None
                return mod.muse_attention_backward(grad, q, k, v, key_padding_mask=key_padding_mask,
                                                   saved=saved, **kw)
    from ._compat import autograd_inside_op
    with autograd_inside_op():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        o = attention_forward(qd, kd, vd, key_padding_mask, _for_backward=True, **params)
        dq, dk, dv = torch.autograd.grad(o, (qd, kd, vd), grad, allow_unused=True)
    zeros = lambda t: torch.zeros_like(t)  # noqa: E731
    return (dq if dq is not None else zeros(q), dk if dk is not None else zeros(k),
            dv if dv is not None else zeros(v))
