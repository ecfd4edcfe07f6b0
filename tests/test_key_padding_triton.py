"""Key-padding masks in the Triton path (interpreter on the CPU, the GPU when present): exact at the limit,
padded keys/values have no influence, all-masked rows are finite zeros."""
import pytest
import torch

pytest.importorskip("triton")

from muse_compile.kernels import triton_muse as T  # noqa: E402
from muse_compile.kernels.reference import exact_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(seed=0, B=2, H=2, N=40, D=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(DEV) for _ in range(3))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 31:] = False     # right padding
    mask[1, :6] = False      # left padding
    return q, k, v, mask.to(DEV)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_masked_exact_at_limit(causal):
    q, k, v, mask = _inputs()
    out, lse = T.muse_attention(q, k, v, causal=causal, clusters=64, block_size=16, key_padding_mask=mask)
    e = exact_attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    rows_with_keys = torch.isfinite(exact_attention(q, k, v, causal=causal, key_padding_mask=mask,
                                                    return_lse=True)[1])
    assert torch.equal(torch.isfinite(lse), rows_with_keys)
    assert (out[~rows_with_keys] == 0).all()
    err = (out - e)[rows_with_keys].abs().max().item()
    assert err < 1e-4, err


@pytest.mark.parametrize("causal", [False, True])
def test_triton_padded_keys_have_no_influence(causal):
    q, k, v, mask = _inputs(seed=1, N=96)
    kw = dict(causal=causal, clusters=3, block_size=16, key_padding_mask=mask)
    base, _ = T.muse_attention(q, k, v, **kw)
    pad = ~mask[:, None, :, None].expand_as(k)
    k2 = torch.where(pad, torch.full_like(k, 50.0), k)
    v2 = torch.where(pad, torch.full_like(v, -1e3), v)
    out, _ = T.muse_attention(q, k2, v2, **kw)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max().item() < 1e-5
