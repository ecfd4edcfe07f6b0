"""Error of an approximation against exact attention: the relative squared error (RSE)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["relative_squared_error", "attention_error"]


def relative_squared_error(approx: torch.Tensor, exact: torch.Tensor, *, centered: bool = False,
                           dim: Optional[tuple] = None) -> torch.Tensor:
    r"""``‖approx − exact‖² / ‖exact‖²`` computed in float64.

    Args:
        approx, exact: tensors of one shape, e.g. attention outputs ``[B, H, N, Dv]``.
        centered: divide by ``‖exact − mean_n exact‖²`` instead, where the mean runs over the token axis
            (``-2``): this is ``1 − R²`` and does not reward getting a constant offset right.
        dim: the dims to sum over; default all (one number). ``dim=(-2, -1)`` gives one RSE per head.

    Returns:
        a float64 tensor (0-D by default).
    """
    if approx.shape != exact.shape:
        raise ValueError(f"shapes differ: {tuple(approx.shape)} vs {tuple(exact.shape)}")
    a = approx.detach().to(torch.float64)
    e = exact.detach().to(torch.float64)
    ref = e - e.mean(dim=-2, keepdim=True) if centered else e
    dims = tuple(range(a.dim())) if dim is None else dim
    num = (a - e).pow(2).sum(dim=dims)
    den = ref.pow(2).sum(dim=dims)
    return num / den


def attention_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    causal: bool = False, scale: Optional[float] = None,
                    key_padding_mask: Optional[torch.Tensor] = None) -> dict:
    """RSE and centred RSE of ``out`` against exact attention of ``q, k, v`` computed in float64.

    Returns ``{"rse": float, "centered_rse": float}``.
    """
    from muse_compile.kernels.reference import exact_attention

    exact = exact_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale,
                            key_padding_mask=key_padding_mask)
    return {
        "rse": float(relative_squared_error(out, exact)),
        "centered_rse": float(relative_squared_error(out, exact, centered=True)),
    }
