"""The attention corpus through ``mc.optimize``: decision, exact limit, approximate mode, policy switches,
dynamic shapes; and the decoys, kept exact with their reason."""
import pytest
import torch

import muse_compile as mc
from compile_corpus import CORPUS, DECOYS, B, N, make_inputs, sdpa_causal, Entry
from muse_compile.lowering.schedule import causal_schedule

LIMIT = mc.Policy(min_context=4, clusters=64)                     # clusters >= every key length: exact
APPROX = mc.Policy(min_context=4, clusters=2, block_size=2, kmeans_iters=2)
OFF = mc.Policy(min_context=10_000, clusters=4)


def _sites(om, pol):
    recs = om._entries[pol].backend.records
    assert recs, "nothing compiled"
    return [s for r in recs for s in r.sites]


def _valid_rows(e, pad, n):
    """Query rows to compare: rows with no visible key differ by convention (zeros vs NaN/uniform)."""
    rows = torch.ones(B, n, dtype=torch.bool)
    if pad is not None and e.causal:
        rows = pad.bool()
    return rows


def _assert_close(a, b, rows, atol=2e-5):
    a, b = a.transpose(1, 2)[rows], b.transpose(1, 2)[rows]    # [*, H, D] at the chosen rows
    assert torch.allclose(a, b, atol=atol, rtol=1e-4), f"max diff {(a - b).abs().max().item():.3g}"


def _approx_active(e, n, pol):
    """False when the causal schedule runs every level exactly at this size (then MuSe == exact)."""
    return not e.causal or any(not lv.exact for lv in causal_schedule(n, pol.block_size, pol.clusters))


def _approx_expected(e, args, pad, pol):
    q, k, v = args[:3]
    return mc.multipole_attention(
        q, k, v, causal=e.causal, scale=e.scale, clusters=pol.clusters, block_size=pol.block_size,
        kmeans_iters=pol.kmeans_iters, dipole=pol.dipole, impl="reference",
        key_padding_mask=None if pad is None else pad.bool())


@pytest.mark.parametrize("e", CORPUS, ids=[e.name for e in CORPUS])
def test_formulation(e):
    torch.manual_seed(0)
    fn = e.make()
    args, pad = make_inputs(e)
    eager = fn(*args)
    om = mc.optimize(fn, backend="aot_eager")

    # exact limit: rewritten, equal to eager
    with mc.policy(LIMIT):
        out = om(*args)
    sites = _sites(om, LIMIT)
    attn = [s for s in sites if s.decision == "rewritten"]
    assert len(attn) == 1, [(s.kind, s.decision, s.reason) for s in sites]
    s = attn[0]
    assert s.kind == e.kind
    assert s.causal == e.causal
    assert s.key_padding == e.pad_in_op
    assert s.kv_shape[-2] == e.m and s.q_shape[-2] == N
    rows = _valid_rows(e, pad, N)
    _assert_close(out, eager, rows)
    assert "muse.attention" in om._entries[LIMIT].backend.records[0].after

    # approximate mode: equal to the functional op on the same q/k/v, and really approximate
    with mc.policy(APPROX):
        approx = om(*args)
    expected = _approx_expected(e, args, pad, APPROX)
    _assert_close(approx, expected, rows, atol=1e-5)
    if _approx_active(e, N, APPROX):
        assert (approx - eager).transpose(1, 2)[rows].abs().max() > 1e-3, "approximate mode equals exact"

    # policy switch: above the key length -> kept, the original graph, exactly eager
    with mc.policy(OFF):
        off = om(*args)
    assert all(x.decision == "kept" for x in _sites(om, OFF) if x.kind == e.kind)
    assert any("min_context" in x.reason for x in _sites(om, OFF))
    _assert_close(off, eager, rows, atol=1e-6)

    # back to a cached policy: no new compile, same result
    n_rec = len(om._entries[APPROX].backend.records)
    with mc.policy(APPROX):
        again = om(*args)
    assert len(om._entries[APPROX].backend.records) == n_rec
    assert torch.equal(again, approx)
    assert set(om.compiled_policies) == {LIMIT, APPROX, OFF}


@pytest.mark.parametrize("e", DECOYS, ids=[e.name for e in DECOYS])
def test_decoy_kept(e):
    torch.manual_seed(0)
    fn = e.make()
    args, pad = make_inputs(e)
    om = mc.optimize(fn, backend="aot_eager")
    with mc.policy(LIMIT):
        out = om(*args)
    sites = _sites(om, LIMIT)
    assert sites, "decoy produced no site"
    assert all(s.decision == "kept" for s in sites), [(s.kind, s.reason) for s in sites]
    assert any(e.reason in s.reason for s in sites), [s.reason for s in sites]
    assert "muse.attention" not in om._entries[LIMIT].backend.records[0].after
    if not e.random:
        eager = fn(*args)
        for a, b in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
            assert torch.allclose(a, b, atol=1e-6)


def test_corpus_size():
    assert len(CORPUS) >= 20 and len(DECOYS) >= 5


DYNAMIC = ["sdpa_causal", "sdpa_pad_bool", "hand_gqa_repeat_kv", "hand_pad_hf_extended_causal"]


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_shapes_one_graph_both_sides(name):
    e = next(x for x in CORPUS if x.name == name)
    fn = e.make()
    pol = APPROX.replace(min_context=12)
    om = mc.optimize(fn, backend="aot_eager", dynamic=True)
    with mc.policy(pol):
        short_args, short_pad = make_inputs(e, n=10, m=10, seed=1)
        long_args, long_pad = make_inputs(e, n=16, m=16, seed=2)
        short = om(*short_args)
        long = om(*long_args)
    recs = om._entries[pol].backend.records
    assert len(recs) == 1, "recompiled for the second length"
    site = [s for s in recs[0].sites if s.decision == "rewritten"]
    assert len(site) == 1 and "dynamic" in site[0].reason
    assert not isinstance(site[0].kv_shape[-2], int)
    # below min_context at run time: exact; above: MuSe, equal to the functional op
    _assert_close(short, fn(*short_args), _valid_rows(e, short_pad, 10))
    _assert_close(long, _approx_expected(e, long_args, long_pad, pol), _valid_rows(e, long_pad, 16), atol=1e-5)
    if _approx_active(e, 16, pol):
        assert (long - fn(*long_args)).transpose(1, 2)[_valid_rows(e, long_pad, 16)].abs().max() > 1e-3


def test_policy_disabled_and_causal_off():
    e = next(x for x in CORPUS if x.name == "hand_causal_where")
    fn = e.make()
    args, _ = make_inputs(e)
    om = mc.optimize(fn, backend="aot_eager")
    with mc.policy(LIMIT.replace(enabled=False)):
        om(*args)
    assert [s.reason for s in _sites(om, LIMIT.replace(enabled=False))] == ["policy disabled (enabled=False)"]
    with mc.policy(LIMIT.replace(causal=False)):
        om(*args)
    assert [s.reason for s in _sites(om, LIMIT.replace(causal=False))] == ["causal site and policy.causal=False"]


def test_pinned_policy_ignores_context():
    e = CORPUS[0]
    fn = e.make()
    args, _ = make_inputs(e)
    om = mc.optimize(fn, policy=LIMIT, backend="aot_eager")
    with mc.policy(OFF):
        om(*args)
    assert om.compiled_policies == [LIMIT]


def test_policy_cache_is_bounded():
    e = CORPUS[0]
    fn = e.make()
    args, _ = make_inputs(e)
    om = mc.optimize(fn, backend="eager")
    for i in range(10):
        with mc.policy(OFF.replace(min_context=1000 + i)):
            om(*args)
    assert len(om.compiled_policies) == 8


def test_causal_approximation_active_through_compile():
    """A causal size where the schedule has a MuSe level: compiled output = functional op != exact."""
    e = Entry("sdpa_causal_long", lambda: sdpa_causal, causal=True)
    pol = mc.Policy(min_context=4, clusters=1, block_size=2)
    n = 128          # S = 64 = EXACT_LEVEL_FACTOR · C is the first MuSe level
    assert _approx_active(e, n, pol)
    args, _ = make_inputs(e, n=n, m=n)
    om = mc.optimize(sdpa_causal, backend="aot_eager")
    with mc.policy(pol):
        out = om(*args)
    expected = _approx_expected(e, args, None, pol)
    assert torch.allclose(out, expected, atol=1e-5)
    assert (out - sdpa_causal(*args)).abs().max() > 1e-3
