"""The Triton MuSe forward against the PyTorch reference, in the Triton interpreter on the CPU (tiny shapes).

Data: queries/keys drawn from a few well-separated modes, so k-means assignments cannot flip between the
kernels and the reference through rounding; the comparison is then tight (fp32 rel err <= 1e-4)."""
import pytest
import torch

triton = pytest.importorskip("triton")

from muse_compile.kernels import reference as R  # noqa: E402
from muse_compile.kernels import triton_muse as T  # noqa: E402
from muse_compile.lowering import plan as PL  # noqa: E402


pytestmark = pytest.mark.usefixtures("muse_levels_at_tiny_sizes")     # tests/conftest.py


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _data(B, H, Hkv, N, M, D, Dv, dtype, seed, modes=6):
    g = torch.Generator().manual_seed(seed)
    cent = torch.randn(modes, D, generator=g) * 4

    def mix(h, n):
        idx = torch.randint(0, modes, (B, h, n), generator=g)
        return cent[idx] + 0.1 * torch.randn(B, h, n, D, generator=g)
    return mix(H, N).to(dtype), mix(Hkv, M).to(dtype), torch.randn(B, Hkv, M, Dv, generator=g).to(dtype)


def _check(q, k, v, tol=1e-4, lse_tol=1e-5, **kw):
    o1, l1 = T.muse_attention(q, k, v, **kw)
    o0, l0 = R.muse_attention(q, k, v, **kw)
    assert o1.dtype == q.dtype and o1.shape == o0.shape and l1.dtype == torch.float32
    assert not o1.isnan().any() and not l1.isnan().any()
    assert _rel(o1, o0) <= tol
    fin = torch.isfinite(l0)
    assert torch.equal(fin, torch.isfinite(l1))
    if fin.any():
        assert _rel(l1[fin], l0[fin]) <= lse_tol
    return o1, l1


CASES = [
    # B, H, Hkv, N, M, D, Dv, causal, mask, dipole, iters, clusters
    (2, 4, 2, 80, 80, 20, 24, False, True, True, 2, 6),      # GQA, padded head dims, padding mask
    (1, 2, 2, 64, 48, 16, 32, False, False, False, 0, 6),    # N != M, Dv != D, monopole, no Lloyd step
    (2, 2, 1, 100, 100, 16, 16, True, True, True, 1, 2),     # causal with MuSe levels + tail pair + mask
    (1, 2, 1, 300, 300, 16, 16, False, True, True, 2, 4),    # several k-means tiles per program
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_whole_op_matches_reference_fp32(case):
    B, H, Hkv, N, M, D, Dv, causal, mask, dipole, iters, C = case
    q, k, v = _data(B, H, Hkv, N, M, D, Dv, torch.float32, seed=sum(case[:7]))
    kpm = None
    if mask:
        g = torch.Generator().manual_seed(5)
        kpm = torch.rand(B, M, generator=g) > 0.3
        if B > 1:
            kpm[1] = False          # a batch row with every key masked: zeros, lse = -inf
    if causal:
        assert any(not lv.exact for lv in R.causal_schedule(N, 16, C))
    o, l = _check(q, k, v, causal=causal, clusters=C, dipole=dipole, kmeans_iters=iters, block_size=16,
                  key_padding_mask=kpm)
    if mask and B > 1:
        assert (o[1] == 0).all() and (l[1] == float("-inf")).all()


def test_fp16_matches_reference():
    q, k, v = _data(1, 2, 1, 64, 64, 16, 16, torch.float16, seed=3)
    _check(q, k, v, tol=1e-3, clusters=6)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_at_limit(causal):
    q, k, v = _data(1, 2, 1, 40, 40, 16, 16, torch.float32, seed=4, modes=40)
    o, _ = _check(q, k, v, causal=causal, clusters=64, block_size=16)
    assert _rel(o, R.exact_attention(q, k, v, causal=causal)) <= 1e-4


def test_degenerate_repeated_tokens():
    x = torch.randn(1, 1, 1, 16).expand(1, 2, 50, 16).contiguous()
    v = torch.randn(1, 2, 50, 16)
    o, l = T.muse_attention(x, x, v, clusters=8)
    assert torch.isfinite(o).all() and torch.isfinite(l).all()
    assert _rel(o, R.exact_attention(x, x, v)) <= 1e-4


def test_plan_and_generated_source():
    p = PL.plan(batch=4, heads=8, kv_heads=2, n=16384, m=16384, head_dim=64, value_dim=64, dtype=torch.bfloat16,
                causal=True, clusters=64, interpret=False)
    assert p.spec.precision == "tf32" and p.groups == 4
    assert p.exact_chunk == 256 << sum(lv.exact for lv in R.causal_schedule(16384, 256, 64))
    assert [lv.segment for lv in p.levels] == [lv.segment for lv in R.causal_schedule(16384, 256, 64) if not lv.exact]
    src = PL.generated_source(p)
    assert "def stage2(" in src and "tl.arange(0, 64)" in src and "$" not in src
    assert "MuSe Triton plan" in PL.describe(p)
    p2 = PL.plan(batch=1, heads=1, kv_heads=1, n=100, m=100, head_dim=20, value_dim=24, dtype=torch.float32,
                 causal=False, dipole=False)
    assert p2.spec.bd == 32 and p2.spec.bdv == 32 and p2.spec.precision == ("ieee" if PL._interpreting() else "tf32x3")
    assert "stage1" in p2.kernels() and "guard" not in p2.kernels()


def test_supports_and_errors():
    q = torch.randn(1, 2, 8, 16)
    ok, why = PL.supports(q, q, q, causal=False)
    assert ok, why
    ok, why = PL.supports(q.double(), q.double(), q.double())
    assert not ok and "float64" in why
    ok, why = PL.supports(q, q, q, clusters=1000, query_clusters=1000)
    assert ok  # clusters are capped by the sequence length (8)
    big = torch.randn(1, 1, 600, 16)
    ok, why = PL.supports(big, big, big, clusters=512)
    assert not ok and "clusters" in why
    with pytest.raises(ValueError):
        T.muse_attention(q.double(), q.double(), q.double())


def test_gpu_limits_and_tiles_for_wide_heads():
    """On the GPU, float32 tiles are twice as wide as 16-bit ones: above head dim 64 the float32 plan uses
    32-row tiles and refuses more than 64 clusters, above 128 it refuses (a launch would raise OutOfResources;
    shared memory of every launch: benchmarks/kernel_resources.py --grid). 16-bit heads of 256 fit with
    32-row stage-2 tiles at 128 clusters. The interpreter has no such limit."""
    f32, bf16 = torch.float32, torch.bfloat16
    assert PL.gpu_limits(f32, 8192, 8192, 64, 64, 128) == ""
    assert PL.gpu_limits(f32, 8192, 8192, 128, 128, 64) == ""
    assert "more than 64 clusters" in PL.gpu_limits(f32, 8192, 8192, 128, 128, 128)
    assert "more than 64 clusters" in PL.gpu_limits(f32, 8192, 8192, 96, 96, 32, query_clusters=128)
    assert PL.gpu_limits(f32, 8192, 8192, 128, 128, 128, query_clusters=64) != ""
    assert "above 128" in PL.gpu_limits(f32, 8192, 8192, 64, 256, 16)
    assert PL.gpu_limits(f32, 8192, 8192, 256, 256, 128, interpret=True) == ""
    assert PL.gpu_limits(bf16, 8192, 8192, 256, 256, 128) == ""
    assert PL.gpu_limits(f32, 40, 40, 128, 128, 128) == ""     # clusters capped by the length

    def plan(dtype, D, C, causal=True):
        return PL.plan(batch=1, heads=2, kv_heads=1, n=65536, m=65536, head_dim=D, value_dim=D, dtype=dtype,
                       causal=causal, clusters=C, interpret=False)
    p = plan(f32, 128, 64)
    assert (p.ba_stage1, p.bn_stage1, p.bm_stage2, p.bm_exact, p.bn_kmeans) == (32, 32, 32, 32, 32)
    assert plan(f32, 64, 64).ba_stage1 == 64 and plan(bf16, 128, 64).bm_stage2 == 64
    assert plan(bf16, 256, 128).bm_stage2 == 32 and plan(bf16, 256, 64).bm_stage2 == 64
    assert plan(bf16, 128, 64).warps_centroid == 4 and plan(bf16, 64, 64).warps_centroid == 2
    assert plan(bf16, 128, 64).power_dot and not plan(bf16, 64, 64).power_dot
    assert plan(bf16, 128, 64).bm_exact == 128 and plan(bf16, 256, 64).bm_exact == 64
    assert plan(bf16, 128, 64).bn_kmeans == 128 and plan(bf16, 128, 64).warps_stage2 == 4


@pytest.mark.parametrize("causal,dipole", [(False, False), (False, True), (True, True)])
def test_native_16bit_path_matches_reference(causal, dipole):
    """The GPU's 16-bit path (16-bit dot operands, 16-bit k̃/ṽ/g, rounded tilt points), run in the interpreter.

    Not bit-comparable with the float32 reference: tilt points and summaries are rounded to fp16. Measured
    (2026-11-22): rel err 3e-4..7e-4 monopole, 0.9e-3..1.7e-3 with the dipole (its direction is
    ill-conditioned on this data's isotropic offsets), lse 2e-5..3e-5; the bounds leave 3x room."""
    q, k, v = _data(2, 2, 1, 80, 80, 16, 16, torch.float16, seed=3)
    kpm = torch.rand(2, 80, generator=torch.Generator().manual_seed(1)) > 0.3
    kw = dict(clusters=6, causal=causal, dipole=dipole, block_size=16, key_padding_mask=kpm)
    T.TUNE["native_16bit_in_interpreter"] = True
    try:
        assert T.make_plan(q, k, v, **{x: y for x, y in kw.items()}).spec.dot_dtype == "float16"
        _check(q, k, v, tol=5e-3, lse_tol=1e-4, **kw)
    finally:
        T.TUNE.clear()


@pytest.mark.parametrize("pos_atomic", [False, True])
def test_kmeans_position_modes(pos_atomic):
    """Both ways of placing tokens in the counting sort (per-token atomics; per-program ranks) give the
    reference's result, acausal and causal (answer sets), with a mask."""
    q, k, v = _data(2, 2, 1, 300, 300, 16, 16, torch.float32, seed=11)
    kpm = torch.rand(2, 300, generator=torch.Generator().manual_seed(2)) > 0.2
    T.TUNE["pos_atomic"] = pos_atomic
    try:
        for causal in (False, True):
            _check(q, k, v, clusters=4, causal=causal, block_size=32, key_padding_mask=kpm)
    finally:
        T.TUNE.clear()


def test_deterministic_mode_is_refused():
    q, k, v = _data(1, 2, 1, 64, 64, 16, 16, torch.float32, seed=12)
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="not deterministic"):
            T.muse_attention(q, k, v, clusters=4)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            T.muse_attention(q, k, v, clusters=4)
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def test_causal_chunks_not_aligned_to_tiles():
    """A block size that is no multiple of the exact kernel's tiles: query tiles straddle two exact chunks
    (fully masked path) or sit inside one (unmasked key blocks, then the diagonal)."""
    q, k, v = _data(1, 2, 1, 150, 150, 16, 16, torch.float32, seed=8)
    kpm = torch.rand(1, 150, generator=torch.Generator().manual_seed(3)) > 0.25
    p = T.make_plan(q, k, v, causal=True, clusters=1, block_size=24, key_padding_mask=kpm)
    assert p.exact_chunk % p.bm_exact != 0 and p.levels
    _check(q, k, v, causal=True, clusters=1, block_size=24, key_padding_mask=kpm)


def test_per_cluster_programs_take_clusters_largest_first():
    """``scatter_perm`` writes each set's clusters by size (largest first, ties in index order) into the state;
    the per-cluster kernels (centroids, stage 1, stage 2 and their backward) take their clusters in that order.
    Checked on a causal call with a tail pair (answer sets apart from fit sets) and a padding mask: every
    order is the stable descending sort of its set's final counts, and the op still equals the reference."""
    B, H, Hkv, N, D = 2, 2, 1, 100, 16
    q, k, v = _data(B, H, Hkv, N, N, D, D, torch.float32, seed=11)
    kpm = torch.rand(B, N, generator=torch.Generator().manual_seed(5)) > 0.3
    kw = dict(causal=True, clusters=4, kmeans_iters=1, block_size=16, key_padding_mask=kpm)
    o, lse, state = T.muse_attention(q, k, v, return_state=True, **kw)
    pl = T.make_plan(q, k, v, **kw)
    _, kept = T.state_views(pl, state)
    assert any(not lv.same for lv in pl.levels)
    for lv, kp in zip(pl.levels, kept):
        pairs = [("qord", "qcnt", lv.q_clusters), ("kord", "kcnt", lv.k_clusters)]
        if not lv.same:
            pairs.append(("aord", "acnt", lv.q_clusters))
        for on, cn, C in pairs:
            order, cnt = kp[on].view(-1, C).long(), kp[cn].view(-1, C)
            assert torch.equal(order, T._size_order(cnt).long()), on
            sizes = torch.gather(cnt, 1, order)
            assert (sizes[:, 1:] <= sizes[:, :-1]).all() and (cnt > 0).any(), on
    o0, _ = R.muse_attention(q, k, v, **kw)
    assert _rel(o, o0) <= 1e-4
