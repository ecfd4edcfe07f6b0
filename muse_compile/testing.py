"""Synthetic attention inputs shared by the tests, ``docs/accuracy.md`` and the benchmarks.

Two families:

* ``gaussian_mixture_qkv``: queries and keys drawn around ``modes`` centres (separate centres for queries,
  keys and values, as trained projections give), so attention has structure that clustering can find;
* ``gaussian_qkv``: i.i.d. standard normal q, k, v, whose attention is nearly uniform: the hard case for
  any clustering method.

``shared_mixture_qkv`` is the speed benchmark's input (``benchmarks/attention.py``): queries and keys around
the same centres.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["gaussian_mixture_qkv", "gaussian_qkv", "shared_mixture_qkv"]


def gaussian_mixture_qkv(B: int, H: int, N: int, D: int, *, M: Optional[int] = None, Hkv: Optional[int] = None,
                         Dv: Optional[int] = None, modes: int = 64, noise: float = 0.3, spread: float = 1.0,
                         seed: int = 0, dtype=torch.float32, device="cpu") -> Tuple[torch.Tensor, ...]:
    """q ``[B, H, N, D]``, k ``[B, Hkv, M, D]``, v ``[B, Hkv, M, Dv]`` from a Gaussian mixture.

    Each token picks a mode uniformly; q = c_q[mode] + noise·ε, k = c_k[mode] + noise·ε and
    v = c_v[mode] + 0.5·ε, with centres c ~ N(0, spread²·I). Modes are drawn per (batch, head), token order is
    random (no positional structure to exploit). With the default scale D^-½ the logits have a standard
    deviation of about spread².
    """
    M = N if M is None else M
    Hkv = H if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)

    def draw(heads, length, dim, centre_scale, jitter):
        centres = torch.randn(B, heads, modes, dim, generator=g) * centre_scale
        mode = torch.randint(0, modes, (B, heads, length), generator=g)
        base = torch.gather(centres, 2, mode.unsqueeze(-1).expand(B, heads, length, dim))
        return base + jitter * torch.randn(B, heads, length, dim, generator=g), mode

    q, _ = draw(H, N, D, spread, noise)
    # keys and values share their modes (a key's cluster says something about its value)
    centres_k = torch.randn(B, Hkv, modes, D, generator=g) * spread
    centres_v = torch.randn(B, Hkv, modes, Dv, generator=g)
    mode = torch.randint(0, modes, (B, Hkv, M), generator=g)
    k = torch.gather(centres_k, 2, mode.unsqueeze(-1).expand(B, Hkv, M, D)) + noise * torch.randn(B, Hkv, M, D, generator=g)
    v = torch.gather(centres_v, 2, mode.unsqueeze(-1).expand(B, Hkv, M, Dv)) + 0.5 * torch.randn(B, Hkv, M, Dv, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def gaussian_qkv(B: int, H: int, N: int, D: int, *, M: Optional[int] = None, Hkv: Optional[int] = None,
                 Dv: Optional[int] = None, seed: int = 0, dtype=torch.float32, device="cpu"):
    """i.i.d. standard normal q ``[B, H, N, D]``, k ``[B, Hkv, M, D]``, v ``[B, Hkv, M, Dv]``."""
    M = N if M is None else M
    Hkv = H if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, Hkv, M, D, generator=g)
    v = torch.randn(B, Hkv, M, Dv, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def shared_mixture_qkv(B: int, H: int, N: int, D: int, *, seed: int, modes: int = 64, noise: float = 0.5,
                       dtype=torch.bfloat16, device="cuda") -> Tuple[torch.Tensor, ...]:
    """q, k, v ``[B, H, N, D]``: q and k = a shared centre ``c ~ N(0, I)`` (one of ``modes`` per (batch, head))
    + noise·ε, drawn independently for q and k (semantic clusters shared by queries and keys); v i.i.d.
    standard normal. The random stream (a generator on ``device`` seeded with ``seed``) is the one the
    attention benchmark's timings and RSE columns were measured on."""
    g = torch.Generator(device=device).manual_seed(seed)
    c = torch.randn(B, H, modes, D, generator=g, device=device)

    def draw():
        idx = torch.randint(0, modes, (B, H, N), generator=g, device=device)
        return torch.gather(c, 2, idx[..., None].expand(B, H, N, D)) + noise * torch.randn(
            B, H, N, D, generator=g, device=device)
    q, k = draw(), draw()
    v = torch.randn(B, H, N, D, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)
