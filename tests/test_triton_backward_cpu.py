"""The Triton stage-2 backward (``triton_muse.stage2_backward``) against autograd of the reference's stage 2
(``reference.summary_attention`` + λ·dipole), in the Triton interpreter on the CPU (tiny shapes, float32)."""
import pytest
import torch

pytest.importorskip("triton")

from muse_compile.kernels import reference as R  # noqa: E402
from muse_compile.kernels import triton_muse as T  # noqa: E402


pytestmark = pytest.mark.usefixtures("muse_levels_at_tiny_sizes")     # tests/conftest.py


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("dipole,merged,empty", [(True, True, True), (True, False, False), (False, True, False)])
def test_stage2_backward_matches_reference_autograd(dipole, merged, empty):
    """merged: stage 2's output is LSE-merged with another partial attention (as in a causal level) and the
    gradient flows through the merged output."""
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, N, D, Dv, Cq, Ck = 2, 1, 2, 70, 12, 20, 3, 5
    H, Z, A = Hkv * G, B * Hkv, G * Cq
    scale = D ** -0.5
    q = torch.randn(B, H, N, D, generator=g)
    assign = torch.randint(0, Cq, (Z, G, N), generator=g)
    kt = torch.randn(Z, A, Ck, D, generator=g) * 0.5
    vt = torch.randn(Z, A, Ck, Dv, generator=g)
    beta = torch.randn(Z, A, Ck, generator=g)
    if empty:
        beta[0, 1, 2] = float("-inf")          # an empty key cluster: weight 0, no gradient
    gs = torch.randn(Z, A, Ck, Dv, generator=g) * 0.3 if dipole else None
    # σ spread so that some queries fall outside the trust bound T/σ_j and are clipped, some not
    sigma = torch.rand(Z, A, Ck, generator=g) * 3 + 0.05 if dipole else None
    qbar = torch.randn(Z, A, D, generator=g) * 0.3
    u = torch.nn.functional.normalize(torch.randn(Z, A, D, generator=g), dim=-1)
    lam = torch.rand(Z, G, generator=g)
    dout = torch.randn(B, H, N, Dv, generator=g)
    other = (torch.randn(B, H, N, Dv, generator=g), torch.randn(B, H, N, generator=g)) if merged else None

    leaves = [t.clone().requires_grad_(True) for t in (q, kt, vt, beta, qbar)]
    qq, ktr, vtr, betar, qbr = leaves
    gr = gs.clone().requires_grad_(True) if dipole else None
    qs = (qq * scale).reshape(Z, G, N, D).reshape(Z, G * N, D)
    offset = (torch.arange(G) * Cq).view(1, G, 1)
    summ = R.Summaries(ktr, vtr, betar, gr, sigma)     # σ: a constant, as in the reference's stage 1
    out, lse, dip = R.summary_attention(qs, (assign + offset).reshape(Z, G * N), summ, qbar=qbr,
                                        u=u if dipole else None)
    out = out.view(Z, G, N, Dv)
    if dipole:
        out = out + lam.view(Z, G, 1, 1) * dip.view(Z, G, N, Dv)
    out, lse = out.reshape(B, H, N, Dv), lse.reshape(B, H, N)
    if merged:
        out, lse = R.merge_partials(out, lse, *other)
    loss = (out * dout).sum()
    extra = [gr] if dipole else []
    ref = torch.autograd.grad(loss, leaves + extra, allow_unused=True)
    ref = [torch.zeros_like(x) if r is None else r for x, r in zip(leaves + extra, ref)]   # dq̄: monopole

    dq, (dkt, dvt, dbeta, dg), dqb = T.stage2_backward(
        q, dout, assign, kt, vt, beta, gs, sigma, qbar, u if dipole else None, lam, scale=scale,
        query_clusters=Cq, merged=(lse.detach(), out.detach()) if merged else None)
    mine = [dq, dkt, dvt, dbeta, dqb] + ([dg] if dipole else [])
    names = ["dq", "dkt", "dvt", "dbeta", "dqbar", "dg"]
    for name, m, r in zip(names, mine, ref):
        assert torch.isfinite(m).all(), name
        if r.abs().max() == 0:
            assert m.abs().max() < 1e-6, name
        else:
            assert _rel(m, r) < 1e-4, (name, _rel(m, r))
    if dipole:   # the data puts queries on both sides of the trust bounds |t| < T/σ_j
        qa = torch.gather(qbar, 1, (assign + offset).reshape(Z, G * N)[..., None].expand(Z, G * N, D))
        ua = torch.gather(u, 1, (assign + offset).reshape(Z, G * N)[..., None].expand(Z, G * N, D))
        t = ((qs.detach() - qa) * ua).sum(-1)
        bound = R.DIPOLE_TRUST / torch.gather(sigma, 1, (assign + offset).reshape(Z, G * N)[..., None]
                                              .expand(Z, G * N, Ck))
        inside = t[..., None].abs() < bound
        assert inside.any() and (~inside).any()


@pytest.mark.parametrize("dipole,masked", [(True, True), (False, False)])
def test_stage1_backward_matches_reference_autograd(dipole, masked):
    g = torch.Generator().manual_seed(5)
    Z, M, D, Dv, A, Ck = 2, 90, 12, 20, 5, 4
    k = torch.randn(Z, M, D, generator=g) * 0.7
    v = torch.randn(Z, M, Dv, generator=g)
    assign = torch.randint(0, Ck, (Z, M), generator=g)
    assign[0, assign[0] == 3] = 1                  # key cluster 3 of problem 0 is empty
    if masked:
        assign[1, ::7] = Ck                        # masked keys (sentinel): no part in any summary
    qbar = torch.randn(Z, A, D, generator=g) * 0.5
    u = torch.nn.functional.normalize(torch.randn(Z, A, D, generator=g), dim=-1) if dipole else None
    dkt = torch.randn(Z, A, Ck, D, generator=g)
    dvt = torch.randn(Z, A, Ck, Dv, generator=g)
    dbeta = torch.randn(Z, A, Ck, generator=g)
    dg = torch.randn(Z, A, Ck, Dv, generator=g) if dipole else None
    kr, vr, qr = (t.clone().requires_grad_(True) for t in (k, v, qbar))
    summ = R.tilted_summaries(qr, kr, vr, assign, Ck, u=u)
    loss = (summ.kt * dkt).sum() + (summ.vt * dvt).sum() + (torch.where(torch.isfinite(summ.beta), summ.beta, 0)
                                                             * dbeta).sum()
    if dipole:
        loss = loss + (summ.g * dg).sum()
    ref = torch.autograd.grad(loss, (kr, vr, qr))
    dbeta_used = torch.where(torch.isfinite(summ.beta.detach()), dbeta, 0)    # an empty cluster has no β
    mine = T.stage1_backward(k, v, assign, qbar, u, dkt, dvt, dbeta_used, dg, key_clusters=Ck)
    for name, m, r in zip(("dk", "dv", "dqbar"), mine, ref):
        assert torch.isfinite(m).all(), name
        assert _rel(m, r) < 1e-4, (name, _rel(m, r))
    if masked:
        assert (mine[0][1, ::7] == 0).all() and (mine[1][1, ::7] == 0).all()


def _mixture(B, H, Hkv, N, D, Dv, seed, modes=6):
    g = torch.Generator().manual_seed(seed)
    cent = torch.randn(modes, D, generator=g) * 4

    def mix(h):
        return cent[torch.randint(0, modes, (B, h, N), generator=g)] + 0.1 * torch.randn(B, h, N, D, generator=g)
    return mix(H), mix(Hkv), torch.randn(B, Hkv, N, Dv, generator=g)


@pytest.mark.parametrize("causal,dipole,mask", [(False, True, True), (False, False, False), (True, True, True),
                                                 (True, False, False)])
def test_backward_matches_reference_autograd(causal, dipole, mask):
    """The whole Triton backward (forward re-run for the clustering; stage-2 and stage-1 backward kernels and
    the centroid step per MuSe problem batch; causal: the exact part's backward and LSE-merged levels with a
    tail pair) against autograd of the reference op, GQA and a padding mask included. Well separated modes:
    both implementations find the same clusters."""
    B, H, Hkv, N, D, Dv, C = 2, 4, 2, (150 if causal else 96), 16, 24, 4
    q, k, v = _mixture(B, H, Hkv, N, D, Dv, seed=21)
    # logits of a few tens, not ~100: the causal parts are weighted by exp(s − L) with the forward's final
    # log-sum-exp L (the flash-attention backward's identity), and L's float32 rounding (1 ulp of 64 is 8e-6)
    # times near-saturated softmax terms that cancel in dq gave 2e-4..6e-4 relative error at q*1 (measured)
    q = q * 0.25
    kpm = None
    if mask:
        kpm = torch.rand(B, N, generator=torch.Generator().manual_seed(4)) > 0.25
    kw = dict(causal=causal, clusters=C, dipole=dipole, kmeans_iters=2, key_padding_mask=kpm, block_size=16)
    if causal:
        assert any(not lv.exact for lv in R.causal_schedule(N, 16, C))
    dout = torch.randn(B, H, N, Dv, generator=torch.Generator().manual_seed(9))
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, _ = R.muse_attention(qr, kr, vr, **kw)
    ref = torch.autograd.grad((out * dout).sum(), (qr, kr, vr))
    mine = T.muse_attention_backward(dout, q, k, v, **kw)
    for name, m, r in zip(("dq", "dk", "dv"), mine, ref):
        assert m.dtype == r.dtype and m.shape == r.shape
        assert _rel(m, r) < 1e-4, (name, _rel(m, r))
    if mask:
        assert (mine[1].transpose(1, 2)[~kpm] == 0).all() and (mine[2].transpose(1, 2)[~kpm] == 0).all()


def test_stage1_backward_with_atomics_across_centroid_blocks():
    """More query centroids than one stage1_bwd block (KV_ATOMIC: dk and dv added with atomics from several
    programs): the same gradients as autograd of the reference."""
    B, H, Hkv, N, D, C = 1, 4, 1, 96, 16, 4
    q, k, v = _mixture(B, H, Hkv, N, D, D, seed=22)
    q = q * 0.25
    kw = dict(causal=False, clusters=C, dipole=True, kmeans_iters=2)
    dout = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(3))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = R.muse_attention(*leaves, **kw)
    ref = torch.autograd.grad((out * dout).sum(), leaves)
    T.TUNE["ba_stage1_bwd"] = 4          # A = G·C = 16 centroids: four blocks
    try:
        mine = T.muse_attention_backward(dout, q, k, v, **kw)
    finally:
        T.TUNE.clear()
    for name, m, r in zip(("dq", "dk", "dv"), mine, ref):
        assert _rel(m, r) < 1e-4, (name, _rel(m, r))


def test_op_backward_goes_through_triton(monkeypatch):
    """``torch.ops.muse.attention`` with impl="triton" (interpreter): the op's backward runs the Triton
    backward (spied on), acausal and causal, and equals autograd of the reference."""
    import muse_compile as mc
    calls = []
    orig = T.muse_attention_backward
    monkeypatch.setattr(T, "muse_attention_backward", lambda *a, **k: calls.append(1) or orig(*a, **k))
    q, k, v = _mixture(1, 2, 1, 64, 16, 16, seed=5)
    q = q * 0.25          # moderate logits (see test_backward_matches_reference_autograd)
    dout = torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(1))
    for causal in (False, True):
        calls.clear()
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = mc.multipole_attention(*leaves, causal=causal, clusters=4, block_size=16, impl="triton")
        got = torch.autograd.grad((out * dout).sum(), leaves)
        assert len(calls) == 1
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref_out, _ = R.muse_attention(*leaves, causal=causal, clusters=4, block_size=16)
        ref = torch.autograd.grad((ref_out * dout).sum(), leaves)
        for m, r in zip(got, ref):
            assert _rel(m, r) < 1e-4


@pytest.mark.parametrize("causal,dipole", [(False, True), (True, True), (True, False)])
def test_op_backward_reads_the_forward_state(monkeypatch, causal, dipole):
    """The op returns its state (size = the plan's ``state_bytes``, also in the fake kernel) and autograd hands
    it to the backward: the forward kernels run once per training step, not twice, and the gradients equal
    the re-running backward's (the interpreter is deterministic, so both see the same clustering)."""
    from muse_compile import ops
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = _mixture(1, 4, 2, 96, 16, 16, seed=11)
    q = q * 0.25
    mask = torch.ones(1, 96, dtype=torch.bool)
    mask[0, 80:] = False
    kw = dict(causal=causal, clusters=4, dipole=dipole, kmeans_iters=2, block_size=16, key_padding_mask=mask)
    dout = torch.randn(1, 4, 96, 16, generator=torch.Generator().manual_seed(2))
    args = (mask, causal, None, 4, None, dipole, 2, 16, 0, "triton")
    nbytes = T.make_plan(q, k, v, **kw).state_bytes
    with FakeTensorMode() as fm:
        fq, fk, fv = (fm.from_tensor(t) for t in (q, k, v))
        fake_state = torch.ops.muse.attention(fq, fk, fv, fm.from_tensor(mask), *args[1:], True)[1]
    assert fake_state.shape == (nbytes,) and fake_state.dtype == torch.uint8

    calls = []
    orig = T.muse_attention
    monkeypatch.setattr(T, "muse_attention", lambda *a, **k: calls.append(1) or orig(*a, **k))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, state = torch.ops.muse.attention(*leaves, *args, True)
    assert state.shape == (nbytes,) and state.dtype == torch.uint8
    got = torch.autograd.grad((out * dout).sum(), leaves)
    assert len(calls) == 1                         # the forward; the backward re-ran nothing
    rerun = T.muse_attention_backward(dout, q, k, v, **kw)
    assert len(calls) == 2
    for name, m, r in zip(("dq", "dk", "dv"), got, rerun):
        assert _rel(m, r) < 1e-6, (name, _rel(m, r))
    # a state of the wrong size is an error, not a silent misread
    with pytest.raises(ValueError, match="state"):
        T.muse_attention_backward(dout, q, k, v, saved=(out.detach(), state[:-64]), **kw)


def test_no_state_kept_where_the_triton_backward_would_not_run(monkeypatch):
    """Where the Triton backward does not take a call (``backward_supported`` False: tiles too large for the
    GPU), the backward recomputes through the reference, so the op keeps no state (fake and real agree) and
    autograd holds no memory for it; the gradients are the reference's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(T, "backward_supported", lambda *a, **k: False)
    q, k, v = _mixture(1, 2, 1, 64, 16, 16, seed=4)
    args = (None, False, None, 4, None, True, 2, 16, 0, "triton", True)
    with FakeTensorMode() as fm:
        st = torch.ops.muse.attention(*(fm.from_tensor(t) for t in (q, k, v)), *args)[1]
    assert st.shape == (0,)
    leaves = [t.clone().requires_grad_(True) for t in (q * 0.25, k, v)]
    out, state = torch.ops.muse.attention(*leaves, *args)
    assert state.shape == (0,)
    got = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref_out, _ = R.muse_attention(*ref_leaves, clusters=4, block_size=16)
    want = torch.autograd.grad(ref_out.sum(), ref_leaves)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("dynamic", [False, True])
def test_optimize_keeps_the_state_where_shapes_are_static(monkeypatch, dynamic):
    """``mc.optimize`` (Triton path, interpreter): with static shapes the rewritten graph's op keeps its state
    and the backward reads it (the forward kernels run once per step); with ``dynamic=True`` the state's size
    would depend on symbolic lengths, so the op is inserted with ``keep_state=False`` and the backward re-runs
    the forward. The gradients equal the eager op's either way, at two lengths through one dynamic graph."""
    import torch.nn.functional as F
    import muse_compile as mc
    from muse_compile import rewrite
    monkeypatch.setattr(rewrite, "IMPL", "triton")
    calls = []
    orig = T.muse_attention
    monkeypatch.setattr(T, "muse_attention", lambda *a, **k: calls.append(1) or orig(*a, **k))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    om = mc.optimize(fn, backend="aot_eager", dynamic=dynamic)
    pol = mc.Policy(min_context=0, clusters=4, block_size=16)
    for N in ((64, 96) if dynamic else (64,)):
        q, k, v = _mixture(1, 2, 2, N, 16, 16, seed=N)
        leaves = [t.clone().requires_grad_(True) for t in (q * 0.25, k, v)]
        with mc.policy(pol):
            got = om(*leaves)
        n_fwd = len(calls)
        gq = torch.autograd.grad(got.sum(), leaves)
        assert len(calls) - n_fwd == (1 if dynamic else 0)
        leaves2 = [t.detach().clone().requires_grad_(True) for t in leaves]
        want = mc.multipole_attention(*leaves2, causal=True, clusters=4, block_size=16, impl="triton")
        wq = torch.autograd.grad(want.sum(), leaves2)
        assert _rel(got, want) < 1e-6
        for a, b in zip(gq, wq):
            assert _rel(a, b) < 1e-6
    sites = [s for r in om._entries[pol].backend.records for s in r.sites]
    assert len(om._entries[pol].backend.records) == 1 and all(s.decision == "rewritten" for s in sites)


def test_backward_fits_the_gpu_by_measured_shared_memory():
    """``KernelPlan.backward_fits`` follows the AOT measurements (sm_90, triton 3.6) in its docstring."""
    from muse_compile.lowering import plan as PL
    kw = dict(batch=1, heads=2, kv_heads=1, n=8192, m=8192, causal=False, interpret=False)

    def fits(D, C, dtype=torch.bfloat16, **extra):
        return PL.plan(head_dim=D, value_dim=D, clusters=C, dtype=dtype, **dict(kw, **extra)).backward_fits()
    assert fits(64, 256) and fits(128, 128) and fits(64, 64, torch.float16)
    assert not fits(128, 256) and not fits(256, 64)
    assert fits(64, 64, torch.float32) and not fits(64, 128, torch.float32) and not fits(128, 32, torch.float32)
    assert fits(128, 256, interpret=True)


@pytest.mark.parametrize("causal,acc16", [(False, True), (True, True), (False, False), (True, False)])
def test_native_16bit_backward_matches_reference(causal, acc16):
    """The GPU's 16-bit backward (``_mm`` rounds every product's operands to fp16, as flash attention's
    backward does; ``acc16``: dq, dk, dv accumulate in fp16, else float32) run in the interpreter against
    autograd of the float32 reference on the same fp16 inputs. Measured (2026-11-22, float32 accumulators):
    dq 1.7e-3, dk and dv 5e-4..6e-4 relative; the bound leaves over 5x room (the float32 path above is within
    1e-4 on the same kind of data). With stage1_bwd on the stored moments (2026-11-23): dq 1.6e-3..1.7e-3, dk
    and dv 4.9e-4..8.4e-4 (its first pass: dq 1.8e-3, dk and dv 4.9e-4..6.9e-4)."""
    B, H, Hkv, N, D, Dv, C = 1, 2, 1, (150 if causal else 96), 16, 16, 4
    q, k, v = _mixture(B, H, Hkv, N, D, Dv, seed=21)
    q, k, v = (q * 0.25).half(), k.half(), v.half()
    kw = dict(causal=causal, clusters=C, dipole=True, kmeans_iters=2, block_size=16)
    dout = torch.randn(B, H, N, Dv, generator=torch.Generator().manual_seed(9))
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    out, _ = R.muse_attention(*leaves, **kw)
    ref = torch.autograd.grad((out * dout).sum(), leaves)
    T.TUNE.update(native_16bit_in_interpreter=True, bwd_16bit_accumulators=acc16)
    try:
        assert T.make_plan(q, k, v, **kw).spec.native
        mine = T.muse_attention_backward(dout.half(), q, k, v, **kw)
    finally:
        T.TUNE.clear()
    for name, m, r in zip(("dq", "dk", "dv"), mine, ref):
        print(f"fp16 backward causal={causal} acc16={acc16} {name}: {_rel(m.float(), r):.2e}")
        assert m.dtype == torch.float16
        assert _rel(m.float(), r) < 1e-2, (name, _rel(m.float(), r))


@pytest.mark.parametrize("causal,half", [(False, False), (True, False), (False, True)])
def test_stage1_bwd_from_stored_moments_equals_its_first_pass(causal, half):
    """``bwd_stored_moments`` (the plan's default: stage1_bwd takes the tilted moments from the forward's stored
    summaries) against stage1_bwd's own first pass over the keys, on one forward state. float32 summaries are
    the moments (equal to rounding); fp16 ones are rounded as the forward's stage 2 reads them: measured
    3.5e-4..2.3e-3 relative apart here, each as close to the float32 reference as the other (see below)."""
    B, H, Hkv, N, D, Dv, C = 1, 2, 1, (150 if causal else 96), 16, 16, 4
    q, k, v = _mixture(B, H, Hkv, N, D, Dv, seed=23)
    q = q * 0.25
    if half:
        q, k, v = q.half(), k.half(), v.half()
        T.TUNE.update(native_16bit_in_interpreter=True)
    kw = dict(causal=causal, clusters=C, dipole=True, kmeans_iters=2, block_size=16)
    dout = torch.randn(B, H, N, Dv, generator=torch.Generator().manual_seed(9)).to(q.dtype)
    try:
        assert T.make_plan(q, k, v, **kw).bwd_stored_moments
        o, _, st = T.muse_attention(q, k, v, return_state=True, **kw)
        stored = T.muse_attention_backward(dout, q, k, v, saved=(o, st), **kw)
        T.TUNE.update(bwd_stored_moments=False)
        first_pass = T.muse_attention_backward(dout, q, k, v, saved=(o, st), **kw)
    finally:
        T.TUNE.clear()
    for name, a, b in zip(("dq", "dk", "dv"), stored, first_pass):
        assert torch.isfinite(a).all()
        assert _rel(a.float(), b.float()) < (5e-3 if half else 1e-5), (name, _rel(a.float(), b.float()))
        assert _rel(a.float(), b.float()) > 0 or not half
