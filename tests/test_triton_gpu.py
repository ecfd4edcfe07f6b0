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


# Every test uses the shape and options of test_matches_reference (B=2, H=4, Hkv=2, N=1500, D=64, C=4,
# block 32, a key-padding mask) where it can: each new shape, dtype or mask variant compiles another set of
# kernels (10-40 s each set on the device machine), which dominated this file's run time.
N0 = 1500


def _mask(all_valid=False):
    kpm = torch.ones(2, N0, dtype=torch.bool, device="cuda")
    if not all_valid:
        kpm[1, 1200:] = False
    return kpm


def _kw(causal, kpm):
    return dict(causal=causal, clusters=4, kmeans_iters=2, block_size=32, key_padding_mask=kpm)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(dtype, tol, causal):
    from muse_compile.kernels import reference as R
    from muse_compile.kernels.triton_muse import muse_attention
    q, k, v = _inputs(2, 4, 2, N0, 64, 64, dtype, seed=1)
    kw = _kw(causal, _mask())
    o, l = muse_attention(q, k, v, **kw)
    # the reference runs in float32 on the same (rounded) inputs
    o0, l0 = R.muse_attention(q.float(), k.float(), v.float(), **kw)
    assert not o.isnan().any()
    assert _rel(o.float(), o0) <= tol
    fin = torch.isfinite(l0)
    assert torch.equal(fin, torch.isfinite(l))
    assert _rel(l[fin], l0[fin]) <= tol


def test_exact_at_limit():
    # clusters >= N: every token is its own cluster, so MuSe is exact. N = 14 keeps the kernels at 16 padded
    # clusters: at N = 200 (256 padded clusters) the float32 kernels took minutes to compile.
    from muse_compile.kernels import reference as R
    from muse_compile.kernels.triton_muse import muse_attention
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(2, 4, 14, 64, generator=gen, device="cuda")
    k, v = (torch.randn(2, 2, 14, 64, generator=gen, device="cuda") for _ in range(2))
    kpm = torch.ones(2, 14, dtype=torch.bool, device="cuda")
    kpm[1, 9:] = False
    for causal in (False, True):
        o, _ = muse_attention(q, k, v, causal=causal, clusters=256, block_size=32, key_padding_mask=kpm)
        oe = R.exact_attention(q, k, v, causal=causal, key_padding_mask=kpm)
        assert _rel(o, oe) <= 1e-4


def test_causal_no_leakage():
    # fp32 + well-separated data: run-to-run rounding (atomic sums) stays ~1e-6, far below any leak
    from muse_compile.kernels.triton_muse import muse_attention
    q, k, v = _inputs(2, 4, 2, N0, 64, 64, torch.float32, seed=3)
    kw = _kw(True, _mask(all_valid=True))
    o1, _ = muse_attention(q, k, v, **kw)
    for i in (300, 1100):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[:, :, i + 1:] = torch.randn_like(t[:, :, i + 1:])
        o2, _ = muse_attention(q2, k2, v2, **kw)
        assert _rel(o2[:, :, :i + 1], o1[:, :, :i + 1]) <= 1e-5
        assert _rel(o2[:, :, i + 1:], o1[:, :, i + 1:]) > 1e-2


def test_degenerate_no_nan():
    # every token identical: all but one cluster empty in every set
    from muse_compile.kernels.triton_muse import muse_attention
    x = torch.randn(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    q = x.expand(2, 4, N0, 64).contiguous()
    k = x.expand(2, 2, N0, 64).contiguous()
    v = torch.randn(2, 2, N0, 64, device="cuda", dtype=torch.bfloat16)
    for causal in (False, True):
        o, l = muse_attention(q, k, v, **_kw(causal, _mask()))
        assert not o.isnan().any() and not l.isnan().any()
    kpm = torch.zeros(2, N0, dtype=torch.bool, device="cuda")
    o, l = muse_attention(q, k, v, **_kw(False, kpm))
    assert (o == 0).all() and (l == float("-inf")).all()


@pytest.mark.parametrize("causal", [False, True])
def test_no_nan_at_long_context_on_the_benchmark_mixture(causal):
    """The benchmark's inputs at 32k (64-mode mixture shared by q and k, bf16, B·H = 32, C = 64; the k-means fit
    is strided there): the output is finite. A centroid step that summed member offsets about the k-means
    centroid (one pass) gave NaN here on the H100 (2026-11-22, benchmarks/results_round6/fwd_nan/), through
    cancellation in a tight cluster's scatter."""
    from muse_compile.kernels import triton_muse as T
    from muse_compile.testing import shared_mixture_qkv
    B, H, N, D = 4, 8, 32768, 64
    q, k, v = shared_mixture_qkv(B, H, N, D, seed=N + D)
    out, lse = T.muse_attention(q, k, v, causal=causal, clusters=64)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("causal", [False, True])
def test_cuda_graph_and_side_streams(causal):
    """The key side and the exact part run on side streams joined back to the caller's stream: called from a
    non-default stream and replayed from a CUDA graph (the streams fork and join inside the capture) the op
    still matches the reference, and a replay after new inputs are copied in gives the new inputs' result.
    (Runs differ in rounding only: float atomics in the k-means sums and positions.)"""
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    q, k, v = _inputs(2, 4, 2, N0, 64, 64, torch.bfloat16, seed=1)
    kw = _kw(causal, _mask())

    def check(o, lse, q, k, v):
        o0, l0 = R.muse_attention(q.float(), k.float(), v.float(), **kw)
        fin = torch.isfinite(l0)
        assert torch.equal(fin, torch.isfinite(lse))
        return _rel(o.float(), o0), _rel(lse[fin], l0[fin])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        o, lse = T.muse_attention(q, k, v, **kw)
    torch.cuda.current_stream().wait_stream(s)
    eo, el = check(o, lse, q, k, v)
    assert eo <= 1e-2 and el <= 1e-2, (eo, el)
    sq, sk, sv = q.clone(), k.clone(), v.clone()
    with torch.cuda.stream(s):             # warm-up outside the capture (compiles, allocates)
        T.muse_attention(sq, sk, sv, **kw)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        go, glse = T.muse_attention(sq, sk, sv, **kw)
    g.replay()
    torch.cuda.synchronize()
    eo, el = check(go, glse, q, k, v)
    assert eo <= 1e-2 and el <= 1e-2, (eo, el)
    q2, k2, v2 = _inputs(2, 4, 2, N0, 64, 64, torch.bfloat16, seed=8)
    sq.copy_(q2), sk.copy_(k2), sv.copy_(v2)
    g.replay()
    torch.cuda.synchronize()
    eo, el = check(go, glse, q2, k2, v2)
    assert eo <= 1e-2 and el <= 1e-2, (eo, el)
    assert _rel(go.float(), o.float()) > 0.1


@pytest.mark.parametrize("causal,saved", [(False, True), (True, True), (False, False), (True, False)])
def test_backward_matches_reference_bf16(causal, saved):
    """The Triton backward (``triton_muse.muse_attention_backward``) in bf16 against autograd of the float32
    reference on the same (rounded) inputs: relative error and cosine similarity (issue 5 asks >= 0.99), on
    the forward's saved state (as autograd runs it) and with a forward re-run.
    Measured on the H100 (2026-11-22, re-run): rel 8.9e-3 / 4.7e-3 / 3.8e-3 (dq / dk / dv) acausal, 8.0e-3 /
    3.8e-3 / 3.0e-3 causal, cosine >= 0.99996; the bound 3e-2 leaves 3x room."""
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    q, k, v = _inputs(2, 4, 2, N0, 64, 64, torch.bfloat16, seed=3)
    kw = _kw(causal, _mask())
    dout = torch.randn(2, 4, N0, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    leaves = [t.float().clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = R.muse_attention(*leaves, **kw)
    ref = torch.autograd.grad((out * dout).sum(), leaves)
    st = None
    if saved:
        o, _, state = T.muse_attention(q, k, v, return_state=True, **kw)
        st = (o, state)
    got = T.muse_attention_backward(dout.bfloat16(), q, k, v, saved=st, **kw)
    for name, m, r in zip(("dq", "dk", "dv"), got, ref):
        m = m.float()
        assert torch.isfinite(m).all(), name
        cos = torch.nn.functional.cosine_similarity(m.flatten(), r.flatten(), dim=0).item()
        print(f"backward bf16 causal={causal} saved={saved} {name}: rel {_rel(m, r):.2e} cos {cos:.6f}")
        assert _rel(m, r) <= 3e-2 and cos >= 0.99, (name, _rel(m, r), cos)


def _fuzzy_mixture(N, dtype, seed):
    """16 modes with noise 0.5 (B=1, H=4, Hkv=2, D=64): fuzzy clusters, as real activations form."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    cent = torch.randn(16, 64, device="cuda", generator=g)

    def mix(h):
        idx = torch.randint(0, 16, (1, h, N), device="cuda", generator=g)
        return (cent[idx] + 0.5 * torch.randn(1, h, N, 64, device="cuda", generator=g)).to(dtype)
    return mix(4), mix(2), torch.randn(1, 2, N, 64, device="cuda", generator=g).to(dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_reference_fp32(causal):
    """float32: the Triton backward equals the reference's autograd (measured 2e-6..6e-6 relative on this
    data without the mask, benchmarks/backward_accuracy.py; bound 1e-3), padding mask included.

    Not the tight six-mode data of the other tests: there, in float32 causal, dq of one group of answer rows
    of one head was 50-80 % off while dk and dv agreed to 1e-4 (``backward_accuracy.py --diagnose-mask``,
    2026-11-22): k-means settles a near-tie differently from the reference and the difference grows over
    the Lloyd passes until part of a tight mode lands in another cluster, a different (equally valid)
    clustering whose gradient differs. Fuzzy modes leave such ties to single tokens."""
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    N = 4096
    q, k, v = _fuzzy_mixture(N, torch.float32, seed=1)
    kpm = torch.ones(1, N, dtype=torch.bool, device="cuda")
    kpm[0, 3500:] = False
    kw = dict(causal=causal, clusters=32, block_size=256, key_padding_mask=kpm)
    dout = torch.randn(1, 4, N, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = R.muse_attention(*leaves, **kw)
    ref = torch.autograd.grad((out * dout).sum(), leaves)
    got = T.muse_attention_backward(dout, q, k, v, **kw)
    for name, m, r in zip(("dq", "dk", "dv"), got, ref):
        print(f"backward fp32 causal={causal} {name}: rel {_rel(m, r):.2e}")
        assert torch.isfinite(m).all() and _rel(m, r) <= 1e-3, (name, _rel(m, r))


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_backward_is_as_close_to_exact_gradients_as_the_reference(causal):
    """What training sees: the bf16 Triton gradients are as far from exact attention's gradients as the
    float32 reference's (MuSe's own approximation), within 2 %. On fuzzy data bf16 k-means ties move single
    tokens to other clusters, so the bf16 gradients differ from the reference's (acausal dq 0.15 relative)
    yet are no worse an approximation: measured 0.978 / 0.978 (dq), 0.472 / 0.472 (dk), 0.237 / 0.237 (dv)
    acausal (benchmarks/backward_accuracy.py, H100, 2026-11-22)."""
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    N = 4096
    q, k, v = _fuzzy_mixture(N, torch.bfloat16, seed=1)
    kw = dict(causal=causal, clusters=32, block_size=256)
    dout = torch.randn(1, 4, N, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    out, _ = R.muse_attention(*leaves, **kw)
    ref = torch.autograd.grad((out * dout).sum(), leaves)
    lx = [t.float().requires_grad_(True) for t in (q, k, v)]
    ex = torch.autograd.grad((R.exact_attention(*lx, causal=causal) * dout).sum(), lx)
    got = T.muse_attention_backward(dout.bfloat16(), q, k, v, **kw)
    for name, m, r, e in zip(("dq", "dk", "dv"), got, ref, ex):
        a, b = _rel(r, e), _rel(m.float(), e)
        print(f"RSE vs exact gradient, bf16 causal={causal} {name}: reference {a:.4f} Triton {b:.4f}")
        assert b <= 1.02 * a + 5e-3, (name, a, b)


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_exact_backward_through_sdpa_matches_triton_kernels(backend):
    """The exact causal part's backward by torch's cuDNN / flash-attention backward kernel (fed the final
    output and log-sum-exp) equals the Triton exact_causal_bwd kernels' (bf16, GQA, no padding mask, N a
    multiple of the exact chunk), and the gradients it gives match the reference's."""
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    N = 2048
    q, k, v = _inputs(2, 4, 2, N, 64, 64, torch.bfloat16, seed=5)
    kw = dict(causal=True, clusters=4, block_size=32, kmeans_iters=2)
    E = T.make_plan(q, k, v, **kw).exact_chunk
    assert N % E == 0
    dout = torch.randn(2, 4, N, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    saved = T.EXACT_BWD_BACKENDS
    got = {}
    try:
        for name, backends in ((backend, (backend,)), ("triton", ())):
            T.EXACT_BWD_BACKENDS = backends
            got[name] = T.muse_attention_backward(dout.bfloat16(), q, k, v, **kw)
    finally:
        T.EXACT_BWD_BACKENDS = saved
    assert not any(key[0] == backend for key in T._SDPA_FAILED), f"{backend} backward did not run"
    leaves = [t.float().clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = R.muse_attention(*leaves, **kw)
    ref = torch.autograd.grad((out * dout).sum(), leaves)
    for name, a, b, r in zip(("dq", "dk", "dv"), got[backend], got["triton"], ref):
        print(f"{backend} vs triton exact backward {name}: {_rel(a.float(), b.float()):.2e}; "
              f"vs reference {_rel(a.float(), r):.2e} / {_rel(b.float(), r):.2e}")
        assert _rel(a.float(), b.float()) <= 1e-2, name
        assert _rel(a.float(), r) <= 3e-2, name


def test_op_backward_on_cuda_uses_the_triton_backward(monkeypatch):
    """``multipole_attention(impl="triton")`` on CUDA: autograd reaches ``muse_attention_backward`` (spied on;
    ``BACKWARD_ON_GPU``) on the forward's saved state (the forward kernels run once), and its gradients match
    the reference's autograd as closely as the direct call's do (test_backward_matches_reference_bf16)."""
    import muse_compile as mc
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    assert T.BACKWARD_ON_GPU
    calls, fwd = [], []
    orig, orig_fwd = T.muse_attention_backward, T.muse_attention
    monkeypatch.setattr(T, "muse_attention_backward", lambda *a, **k: calls.append(1) or orig(*a, **k))
    monkeypatch.setattr(T, "muse_attention", lambda *a, **k: fwd.append(1) or orig_fwd(*a, **k))
    q, k, v = _inputs(2, 4, 2, N0, 64, 64, torch.bfloat16, seed=3)
    dout = torch.randn(2, 4, N0, 64, device="cuda", dtype=torch.bfloat16)
    kw = dict(causal=True, clusters=4, block_size=32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = mc.multipole_attention(*leaves, impl="triton", **kw)
    got = torch.autograd.grad((out.float() * dout.float()).sum(), leaves)
    assert len(calls) == 1 and len(fwd) == 1
    leaves = [t.float().clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, _ = R.muse_attention(*leaves, **kw)
    ref = torch.autograd.grad((ref_out * dout.float()).sum(), leaves)
    for g, r in zip(got, ref):
        assert torch.isfinite(g).all() and _rel(g.float(), r) <= 3e-2


@pytest.mark.parametrize("D,Dv,dtype", [(128, 128, torch.bfloat16), (128, 128, torch.float32),
                                         (96, 96, torch.float16), (64, 128, torch.bfloat16),
                                         (256, 256, torch.bfloat16)])
@pytest.mark.parametrize("causal", [False, True])
def test_other_head_dims_match_reference(D, Dv, dtype, causal):
    """Head dims other than 64 (the benchmark's), value dim unlike the key dim, each dtype path: the forward
    equals the reference and, where ``backward_supported`` takes the call, so do the gradients. Shared memory
    of every launch was checked ahead of time (benchmarks/kernel_resources.py --grid); this runs them, with C = 64
    so that the summary tiles are as large as the benchmark's."""
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    gen = torch.Generator(device="cuda").manual_seed(D + Dv)
    # causal at C = 64 runs MuSe levels from segments of 64·C = 4096 tokens on (lowering.schedule)
    B, H, Hkv, N, C = 1, 4, 2, (8192 if causal else 2048), 64
    modes = 6

    def mix(h, d):
        c = torch.randn(B, h, modes, d, generator=gen, device="cuda") * 4.0
        i = torch.randint(0, modes, (B, h, N), generator=gen, device="cuda")
        x = torch.gather(c, 2, i[..., None].expand(B, h, N, d))
        return (x + 0.1 * torch.randn(B, h, N, d, generator=gen, device="cuda")) * (0.25 * (64 / d) ** 0.5)
    q, k = mix(H, D).to(dtype), mix(Hkv, D).to(dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=gen, device="cuda").to(dtype)
    kw = dict(causal=causal, clusters=C, block_size=256)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    o, _, state = T.muse_attention(q, k, v, return_state=True, **kw)
    leaves = [t.float().clone().requires_grad_(True) for t in (q, k, v)]
    o0, _ = R.muse_attention(*leaves, **kw)
    print(f"D={D} Dv={Dv} {dtype} causal={causal}: forward rel {_rel(o.float(), o0):.2e}")
    assert torch.isfinite(o).all() and _rel(o.float(), o0) <= tol
    if not T.backward_supported(q, k, v, **kw):
        return
    dout = torch.randn(B, H, N, Dv, device="cuda", generator=gen)
    ref = torch.autograd.grad((o0 * dout).sum(), leaves)
    got = T.muse_attention_backward(dout.to(dtype), q, k, v, saved=(o, state), **kw)
    for name, m, r in zip(("dq", "dk", "dv"), got, ref):
        m = m.float()
        cos = torch.nn.functional.cosine_similarity(m.flatten(), r.flatten(), dim=0).item()
        print(f"  {name}: rel {_rel(m, r):.2e} cos {cos:.6f}")
        assert torch.isfinite(m).all() and _rel(m, r) <= (1e-3 if dtype == torch.float32 else 3e-2), name


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_exact_forward_through_sdpa_matches_triton_kernel(backend):
    """The causal op's exact part (causal attention inside aligned chunks) by torch's cuDNN / flash forward
    kernel equals the op's own exact_causal kernel (bf16, GQA, N a multiple of the chunk): the whole op's
    output and log-sum-exp, and they match the reference. Queries of the first chunk see only the exact part,
    so their log-sum-exp compares the two exact kernels directly."""
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    N = 2048
    q, k, v = _inputs(2, 4, 2, N, 64, 64, torch.bfloat16, seed=5)
    kw = dict(causal=True, clusters=4, block_size=32, kmeans_iters=2)
    pl = T.make_plan(q, k, v, **kw)
    E = pl.exact_chunk
    assert N % E == 0 and pl.levels
    s = 64 ** -0.5
    lse = torch.empty(2, 4, N, device="cuda")
    saved = T.EXACT_FWD_BACKENDS
    got = {}
    try:
        T.EXACT_FWD_BACKENDS = (backend,)
        direct = T._exact_forward_sdpa(q, k, v, s, E, None, lse)
        assert direct is not None, f"{backend} forward did not run"
        got[backend] = T.muse_attention(q, k, v, **kw)
        T.EXACT_FWD_BACKENDS = ()
        got["triton"] = T.muse_attention(q, k, v, **kw)
    finally:
        T.EXACT_FWD_BACKENDS = saved
    (o1, l1), (o2, l2) = got[backend], got["triton"]
    assert o1.dtype == o2.dtype == torch.bfloat16 and o1.is_contiguous()
    o0, l0 = R.muse_attention(q.float(), k.float(), v.float(), **kw)
    print(f"{backend} vs triton exact part: out {_rel(o1.float(), o2.float()):.2e}, "
          f"lse first chunk {(l1[..., :E] - l2[..., :E]).abs().max().item():.2e}; vs reference "
          f"{_rel(o1.float(), o0):.2e} / {_rel(o2.float(), o0):.2e}")
    assert (l1[..., :E] - l2[..., :E]).abs().max().item() <= 1e-3
    assert (lse[..., :E] - l2[..., :E]).abs().max().item() <= 1e-3
    assert _rel(o1.float(), o2.float()) <= 1e-2
    assert _rel(o1.float(), o0) <= 1e-2 and _rel(l1, l0) <= 1e-2
