"""GPU checks of the Triton MuSe forward (skipped without CUDA)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _separated(B, H, N, D, modes, gen, spread=4.0, noise=0.1):
    c = torch.randn(B, H, modes, D, generator=gen, device="cuda") * spread
    idx = torch.randint(0, modes, (B, H, N), generator=gen, device="cuda")
    return torch.gather(c, 2, idx[..., None].expand(B, H, N, D)) + noise * torch.randn(
        B, H, N, D, generator=gen, device="cuda")


def _inputs(B, H, Hkv, N, D, Dv, dtype, seed, modes=6):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # few well-separated modes and fewer clusters than modes: no cluster boundary runs through a mode, so
    # rounding cannot flip a k-means assignment between the kernels and the reference
    q = _separated(B, H, N, D, modes, gen)
    k = _separated(B, Hkv, N, D, modes, gen)
    v = torch.randn(B, Hkv, N, Dv, generator=gen, device="cuda")
    return q.to(dtype) * 0.25, k.to(dtype) * 0.25, v.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(dtype, tol, causal):
    from muse_compile.kernels import reference as R
    from muse_compile.kernels.triton_muse import muse_attention
    q, k, v = _inputs(2, 4, 2, 1500, 64, 64, dtype, seed=1)
    kpm = torch.ones(2, 1500, dtype=torch.bool, device="cuda")
    kpm[1, 1200:] = False
    kw = dict(causal=causal, clusters=4, kmeans_iters=2, block_size=32, key_padding_mask=kpm)
    o, l = muse_attention(q, k, v, **kw)
    # the reference runs in float32 on the same (rounded) inputs
    o0, l0 = R.muse_attention(q.float(), k.float(), v.float(), **kw)
    assert not o.isnan().any()
    assert _rel(o.float(), o0) <= tol
    fin = torch.isfinite(l0)
    assert torch.equal(fin, torch.isfinite(l))
    assert _rel(l[fin], l0[fin]) <= tol


def test_exact_at_limit():
    from muse_compile.kernels import reference as R
    from muse_compile.kernels.triton_muse import muse_attention
    for causal in (False, True):
        q, k, v = _inputs(1, 2, 2, 200, 64, 64, torch.float32, seed=2, modes=200)
        q = torch.randn_like(q)
        k = torch.randn_like(k)
        o, _ = muse_attention(q, k, v, causal=causal, clusters=256, block_size=64)
        oe = R.exact_attention(q, k, v, causal=causal)
        assert _rel(o, oe) <= 1e-4


def test_causal_no_leakage():
    # fp32 + well-separated data: run-to-run rounding (atomic sums) stays ~1e-7, far below any leak
    from muse_compile.kernels.triton_muse import muse_attention
    N = 4096
    q, k, v = _inputs(1, 2, 2, N, 64, 64, torch.float32, seed=3)
    kw = dict(causal=True, clusters=4, block_size=64)
    o1, _ = muse_attention(q, k, v, **kw)
    for i in (700, 2500):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[:, :, i + 1:] = torch.randn_like(t[:, :, i + 1:])
        o2, _ = muse_attention(q2, k2, v2, **kw)
        assert _rel(o2[:, :, :i + 1], o1[:, :, :i + 1]) <= 1e-5
        assert _rel(o2[:, :, i + 1:], o1[:, :, i + 1:]) > 1e-2


def test_degenerate_no_nan():
    from muse_compile.kernels.triton_muse import muse_attention
    N = 3000
    x = torch.randn(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16).expand(1, 2, N, 64).contiguous()
    v = torch.randn(1, 2, N, 64, device="cuda", dtype=torch.bfloat16)
    for causal in (False, True):
        o, l = muse_attention(x, x, v, causal=causal, clusters=64, block_size=256)
        assert not o.isnan().any() and not l.isnan().any()
    kpm = torch.zeros(1, N, dtype=torch.bool, device="cuda")
    o, l = muse_attention(x, x, v, clusters=64, key_padding_mask=kpm)
    assert (o == 0).all() and (l == float("-inf")).all()
