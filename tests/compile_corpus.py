"""A corpus of attention formulations and decoys for the compiler tests.

Every entry takes canonical inputs ``q [B, H, N, D]``, ``k, v [B, Hkv, M, D]`` (and a ``[B, M]`` 0/1 padding
tensor ``pad`` when ``uses_pad``), converts them *inside the compiled function* to its own spelling, and
returns the result in the canonical ``[B, H, N, D]`` layout. ``causal``, ``scale``, ``pad`` describe the
same attention for ``mc.multipole_attention``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

B, H, N, D = 2, 4, 16, 8
M_CROSS = 24
HKV = 2


@dataclasses.dataclass
class Entry:
    name: str
    make: Callable[[], Callable]
    kind: str = "sdpa"
    causal: bool = False
    scale: Optional[float] = None
    hkv: int = H
    m: int = N
    uses_pad: bool = False
    pad_in_op: bool = False       # the op gets a key-padding mask
    decoy: bool = False
    reason: str = ""              # substring of the kept reason (decoys)
    random: bool = False          # output is random (dropout): no output comparison


def _tril(n, m, device=None):
    return torch.tril(torch.ones(n, m, dtype=torch.bool, device=device))


# ----------------------------------------------------------------------------------------- SDPA

def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_bool_tril(q, k, v):
    mask = torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_additive_triu(q, k, v):
    n = q.shape[-2]
    mask = torch.triu(torch.full((n, n), float("-inf"), device=q.device), diagonal=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SdpaBufferMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64),
                             persistent=False)

    def forward(self, q, k, v):
        n = q.shape[-2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[:, :, :n, :n])


def sdpa_cross(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_pad_bool(q, k, v, pad):
    mask = pad.bool().view(pad.shape[0], 1, 1, pad.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_pad_additive_hf(q, k, v, pad):
    ext = pad[:, None, None, :].to(q.dtype)
    ext = (1.0 - ext) * torch.finfo(q.dtype).min
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ext)


def sdpa_pad_causal(q, k, v, pad):
    n = q.shape[-2]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
    mask = causal[None, None] & pad.bool()[:, None, None, :].expand(-1, 1, n, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------- hand-written

def hand_matmul_mul(q, k, v):
    s = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
    return torch.softmax(s, dim=-1) @ v


def hand_torch_matmul_div(q, k, v):
    s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.size(-1))
    return torch.matmul(F.softmax(s, dim=-1), v)


def hand_method_mT(q, k, v):
    s = q.matmul(k.mT) * q.shape[-1] ** -0.5
    return s.softmax(dim=3).matmul(v)


def hand_prescaled(q, k, v):
    qs = q * (1.0 / math.sqrt(q.shape[-1]))
    return torch.softmax(qs @ k.permute(0, 1, 3, 2), -1) @ v


def hand_bmm(q, k, v):
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], t.shape[3]) for t in (q, k, v))
    s = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d)
    return torch.bmm(torch.softmax(s, dim=-1), v3).view(b, h, n, -1)


def hand_einsum(q, k, v):
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * (q.shape[-1] ** -0.5)
    return torch.einsum("bhnm,bhmd->bhnd", s.softmax(-1), v)


def hand_einsum_bshd(q, k, v):
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))     # BSHD
    s = torch.einsum("bnhd,bmhd->bhnm", qb, kb) / math.sqrt(q.shape[-1])
    o = torch.einsum("bhnm,bmhd->bnhd", torch.softmax(s, -1), vb)
    return o.transpose(1, 2)


def hand_casts(q, k, v):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    p = F.softmax(s.float(), dim=-1).type_as(v)
    return p @ v


def hand_softmax_dtype(q, k, v):
    s = (q @ k.transpose(-2, -1)) / 2.0
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return p @ v


def hand_causal_masked_fill(q, k, v):
    n = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device)), float("-inf"))
    return torch.softmax(s, -1) @ v


def hand_causal_where(q, k, v):
    n = q.shape[-2]
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
    s = torch.where(keep, s, torch.finfo(s.dtype).min)
    return s.softmax(-1) @ v


def hand_causal_additive(q, k, v):
    n = q.shape[-2]
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = s + torch.triu(torch.full((n, n), float("-inf"), device=q.device), 1)
    return torch.softmax(s, -1) @ v


def hand_gqa_repeat_interleave(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1) @ v


def _repeat_kv(x, n_rep):
    b, hkv, m, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, n_rep, m, d).reshape(b, hkv * n_rep, m, d)


def hand_gqa_repeat_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, g), _repeat_kv(v, g)
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    n = q.shape[-2]
    s = s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device)), float("-inf"))
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


class HandBSHD(nn.Module):
    """x [B, N, H*D] -> view + permute(0, 2, 1, 3), as in many model files."""

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        xq, xk, xv = (t.transpose(1, 2).reshape(b, t.shape[2], -1) for t in (q, k, v))
        qh = xq.view(b, n, h, d).permute(0, 2, 1, 3)
        kh = xk.view(b, k.shape[2], h, d).permute(0, 2, 1, 3)
        vh = xv.view(b, k.shape[2], h, d).permute(0, 2, 1, 3)
        s = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(d)
        o = torch.matmul(nn.functional.softmax(s, dim=-1), vh)
        o = o.permute(0, 2, 1, 3).contiguous().view(b, n, h * d)
        return o.view(b, n, h, d).transpose(1, 2)


def hand_pad_masked_fill(q, k, v, pad):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = s.masked_fill(~pad.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v


def hand_pad_hf_extended_causal(q, k, v, pad):
    n = q.shape[-2]
    ext = (1.0 - pad[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device)).view(1, 1, n, n)
    s = torch.where(causal, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype, device=s.device))
    s = s + ext
    return torch.matmul(torch.softmax(s, dim=-1), v)


def hand_dropout_eval(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    p = F.dropout(torch.softmax(s, -1), p=0.1, training=False)
    return p @ v


def hand_cross(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1) @ v


# ----------------------------------------------------------------------------------------- decoys

class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(D, 5)

    def forward(self, q, k, v):
        return torch.softmax(self.w(q), dim=-1)


def decoy_wrong_dim(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return torch.softmax(s, dim=-2) @ v


def decoy_softcap(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = torch.tanh(s / 5.0) * 5.0
    return torch.softmax(s, -1) @ v


class DecoyLearnedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, H, N, N) * 0.1)

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + self.bias
        return torch.softmax(s, -1) @ v


def decoy_sliding_window(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band)


def decoy_dropout_train(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return F.dropout(torch.softmax(s, -1), p=0.1, training=True) @ v


def decoy_probs_returned(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1)
    return p @ v, p


def decoy_runtime_4d_mask(q, k, v, pad):
    mask = pad.bool()[:, None, :, None] | pad.bool()[:, None, None, :]  # not a key-padding structure
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[..., : k.shape[-2]])


def decoy_query_padding(q, k, v, pad):
    m = pad.bool()
    mask = m[:, None, :, None] & m[:, None, None, :]   # masks queries too: a look-alike
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, -1e9)
    return torch.softmax(s, -1) @ v


def decoy_sdpa_dropout(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def decoy_alibi(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n, device=q.device, dtype=q.dtype)
    bias = -(i[:, None] - i[None, :]).abs() * 0.5
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias
    return torch.softmax(s, -1) @ v


def hand_tensor_constant_scale(q, k, v):
    s = torch.matmul(q, k.transpose(-1, -2)) / torch.sqrt(torch.tensor(float(q.shape[-1])))
    return torch.softmax(s, -1) @ v


class DecoyLearnedTemperature(nn.Module):
    """A learned scale is a parameter: it may change between calls, so it cannot be folded."""

    def __init__(self):
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(0.7))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * self.temp, -1) @ v


def _f(fn):
    return lambda: fn


MM = "matmul-softmax-matmul"
CORPUS = [
    Entry("sdpa_plain", _f(sdpa_plain)),
    Entry("sdpa_causal", _f(sdpa_causal), causal=True),
    Entry("sdpa_scale", _f(sdpa_scale), scale=0.3),
    Entry("sdpa_gqa", _f(sdpa_gqa), causal=True, hkv=HKV),
    Entry("sdpa_bool_tril", _f(sdpa_bool_tril), causal=True),
    Entry("sdpa_additive_triu", _f(sdpa_additive_triu), causal=True),
    Entry("sdpa_buffer_slice", SdpaBufferMask, causal=True),
    Entry("sdpa_cross", _f(sdpa_cross), m=M_CROSS),
    Entry("sdpa_pad_bool", _f(sdpa_pad_bool), uses_pad=True, pad_in_op=True),
    Entry("sdpa_pad_additive_hf", _f(sdpa_pad_additive_hf), uses_pad=True, pad_in_op=True),
    Entry("sdpa_pad_causal", _f(sdpa_pad_causal), causal=True, uses_pad=True, pad_in_op=True),
    Entry("hand_matmul_mul", _f(hand_matmul_mul), kind=MM),
    Entry("hand_torch_matmul_div", _f(hand_torch_matmul_div), kind=MM),
    Entry("hand_method_mT", _f(hand_method_mT), kind=MM),
    Entry("hand_prescaled", _f(hand_prescaled), kind=MM),
    Entry("hand_bmm", _f(hand_bmm), kind="bmm-softmax-bmm"),
    Entry("hand_einsum", _f(hand_einsum), kind="einsum-softmax-einsum"),
    Entry("hand_einsum_bshd", _f(hand_einsum_bshd), kind="einsum-softmax-einsum"),
    Entry("hand_casts", _f(hand_casts), kind=MM),
    Entry("hand_softmax_dtype", _f(hand_softmax_dtype), kind=MM, scale=0.5),
    Entry("hand_causal_masked_fill", _f(hand_causal_masked_fill), kind=MM, causal=True),
    Entry("hand_causal_where", _f(hand_causal_where), kind=MM, causal=True),
    Entry("hand_causal_additive", _f(hand_causal_additive), kind=MM, causal=True),
    Entry("hand_gqa_repeat_interleave", _f(hand_gqa_repeat_interleave), kind=MM, hkv=HKV),
    Entry("hand_gqa_repeat_kv", _f(hand_gqa_repeat_kv), kind=MM, hkv=HKV, causal=True),
    Entry("hand_bshd_view_permute", HandBSHD, kind=MM),
    Entry("hand_pad_masked_fill", _f(hand_pad_masked_fill), kind=MM, uses_pad=True, pad_in_op=True),
    Entry("hand_pad_hf_extended_causal", _f(hand_pad_hf_extended_causal), kind=MM, causal=True, uses_pad=True,
          pad_in_op=True),
    Entry("hand_dropout_eval", _f(hand_dropout_eval), kind=MM),
    Entry("hand_cross", _f(hand_cross), kind=MM, m=M_CROSS),
    Entry("hand_tensor_constant_scale", _f(hand_tensor_constant_scale), kind=MM),
]

DECOYS = [
    Entry("decoy_classifier", Classifier, kind="softmax", decoy=True, reason="not attention"),
    Entry("decoy_wrong_dim", _f(decoy_wrong_dim), kind="softmax", decoy=True, reason="softmax over dim -2"),
    Entry("decoy_softcap", _f(decoy_softcap), kind="softmax", decoy=True, reason="softcapping"),
    Entry("decoy_learned_bias", DecoyLearnedBias, kind="softmax", decoy=True, reason="parameter"),
    Entry("decoy_sliding_window", _f(decoy_sliding_window), kind="sdpa", decoy=True,
          reason="neither causal nor key-padding"),
    Entry("decoy_dropout_train", _f(decoy_dropout_train), kind="softmax", decoy=True,
          reason="dropout in training", random=True),
    Entry("decoy_probs_returned", _f(decoy_probs_returned), kind="softmax", decoy=True,
          reason="used elsewhere"),
    Entry("decoy_runtime_4d_mask", _f(decoy_runtime_4d_mask), kind="sdpa", decoy=True, uses_pad=True,
          reason="neither causal nor key-padding"),
    Entry("decoy_query_padding", _f(decoy_query_padding), kind="softmax", decoy=True, uses_pad=True,
          reason="neither causal nor key-padding"),
    Entry("decoy_sdpa_dropout", _f(decoy_sdpa_dropout), kind="sdpa", decoy=True, reason="dropout_p=0.1",
          random=True),
    Entry("decoy_alibi", _f(decoy_alibi), kind="softmax", decoy=True, reason="bias"),
    Entry("decoy_learned_temperature", DecoyLearnedTemperature, kind="softmax", decoy=True, reason="tensor"),
]


def make_inputs(e: Entry, n: int = N, m: Optional[int] = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = (e.m if e.m != N else n) if m is None else m
    q = torch.randn(B, H, n, D, generator=g)
    k = torch.randn(B, e.hkv, m, D, generator=g)
    v = torch.randn(B, e.hkv, m, D, generator=g)
    if not e.uses_pad:
        return (q, k, v), None
    pad = torch.ones(B, m, dtype=torch.long)
    pad[0, m - 5:] = 0          # right padding
    pad[1, :3] = 0              # left padding
    return (q, k, v, pad), pad
