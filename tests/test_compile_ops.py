"""The custom op (opcheck, gradients, dispatch), training through a rewritten model, the report, the
``"muse"`` backend and the cacheable pass object."""
import json
import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import muse_compile as mc
from muse_compile import dispatch, ops
from muse_compile.compiler import MuseBackend
from muse_compile.kernels import reference

LIMIT = mc.Policy(min_context=4, clusters=64)


def _qkv(B=2, H=4, Hkv=2, N=8, M=8, D=4, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, H, N, D, generator=g, dtype=dtype), torch.randn(B, Hkv, M, D, generator=g, dtype=dtype),
         torch.randn(B, Hkv, M, D + 2, generator=g, dtype=dtype)]
    return [x.requires_grad_(grad) for x in t]


@pytest.mark.parametrize("causal,kpm,min_context", [(False, False, 0), (True, True, 0), (False, True, 100),
                                                     (True, False, 100)])
def test_opcheck(causal, kpm, min_context):
    q, k, v = _qkv(grad=True)
    mask = None
    if kpm:
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[1, 5:] = False
    args = (q, k, v, mask, causal, None, 3, None, True, 1, 2, min_context, "reference", True)
    torch.library.opcheck(torch.ops.muse.attention.default, args)


def test_op_gradients_match_reference_autograd():
    q, k, v = _qkv(grad=True)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 6:] = False
    kw = dict(causal=True, scale=0.7, clusters=3, dipole=True, kmeans_iters=1, block_size=2, key_padding_mask=mask)
    out = mc.multipole_attention(q, k, v, impl="reference", **kw)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref_out, _ = reference.muse_attention(q, k, v, **kw)
    want = torch.autograd.grad(ref_out, (q, k, v), g)
    assert torch.allclose(out, ref_out)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)


def test_gradcheck_exact_limit():
    q, k, v = _qkv(B=1, H=2, Hkv=1, N=5, M=5, D=3, grad=True)
    f = lambda q, k, v: ops.call_attention(q, k, v, causal=True, clusters=8, block_size=2, impl="reference")  # noqa
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_min_context_switches_to_exact_at_run_time():
    q, k, v = _qkv()
    below = ops.call_attention(q, k, v, clusters=2, min_context=9, impl="reference")
    above = ops.call_attention(q, k, v, clusters=2, min_context=8, impl="reference")
    exact = reference.exact_attention(q, k, v)
    assert torch.allclose(below, exact, atol=1e-12)
    assert not torch.allclose(above, exact, atol=1e-3)


def test_dispatch_impl_choices(monkeypatch):
    q, k, v = _qkv(dtype=torch.float32)
    assert dispatch.resolve_impl(q, k, v, causal=False, key_padding_mask=None, impl="reference")[0] == "reference"
    name, why = dispatch.resolve_impl(q, k, v, causal=False, key_padding_mask=None, impl="auto")
    assert name == "reference" and "cpu" in why
    monkeypatch.setattr(dispatch, "_triton_modules", lambda: (None, None, "module missing"))
    with pytest.raises(dispatch.TritonUnavailable, match="module missing"):
        mc.multipole_attention(q, k, v, impl="triton")


class TinyLM(nn.Module):
    def __init__(self, d=16, h=4):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.qkv2 = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def _split(self, x, lin):
        b, n, d = x.shape
        q, k, v = lin(x).split(d, dim=-1)
        return [t.view(b, n, self.h, d // self.h).transpose(1, 2) for t in (q, k, v)]

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self._split(x, self.qkv)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.transpose(1, 2).reshape(b, n, d)
        q, k, v = self._split(x, self.qkv2)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
        a = torch.softmax(s, dim=-1) @ v
        return self.out(x + a.transpose(1, 2).reshape(b, n, d))


def test_training_grads_equal_eager_at_limit():
    torch.manual_seed(0)
    model = TinyLM()
    x = torch.randn(2, 12, 16)
    model(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    om = mc.optimize(model, backend="aot_eager")
    with mc.policy(LIMIT):
        om(x).square().mean().backward()
    sites = [s for r in om._entries[LIMIT].backend.records for s in r.sites]
    assert [s.decision for s in sites] == ["rewritten", "rewritten"]
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-5), n
    # approximate mode trains too (finite, non-zero gradients)
    model.zero_grad()
    with mc.policy(LIMIT.replace(clusters=2, block_size=2)):
        om(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())


def test_report_content_and_logging(caplog):
    torch.manual_seed(0)
    model = TinyLM()
    x = torch.randn(2, 12, 16)
    with caplog.at_level(logging.INFO, logger="muse_compile"), mc.policy(LIMIT):
        rep = mc.inspect(model, x)
    assert isinstance(rep, mc.Report) and len(rep.sites) == 2
    s0, s1 = rep.sites
    assert isinstance(s0, mc.Site)
    assert (s0.kind, s1.kind) == ("sdpa", "matmul-softmax-matmul")
    assert s0.q_shape == (2, 4, 12, 4) and s0.kv_shape == (2, 4, 12, 4)
    assert s0.causal and s1.causal and s0.decision == s1.decision == "rewritten"
    assert "test_compile_ops.py:" in s0.location and "test_compile_ops.py:" in s1.location
    text = str(rep)
    for word in ("kind", "location", "decision", "reason", "sdpa", "matmul-softmax-matmul", "rewritten"):
        assert word in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["sites"][0]["kind"] == "sdpa" and d["policy"]["min_context"] == 4
    assert len(rep.graphs) == 1
    assert "muse.attention" in rep.graphs[0].after and "muse.attention" not in rep.graphs[0].before
    assert "scaled_dot_product_attention" in rep.graphs[0].before
    msgs = [r.getMessage() for r in caplog.records if r.name == "muse_compile"]
    assert sum("rewritten" in m for m in msgs) >= 2
    # kept sites and reasons under another policy; module path of a submodule
    with mc.policy(min_context=100):
        rep2 = mc.inspect(model, x)
    assert [s.decision for s in rep2.sites] == ["kept", "kept"]
    assert "key length 12 < min_context 100" in rep2.sites[0].reason


def test_report_module_path():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([TinyLM()])

        def forward(self, x):
            return self.blocks[0](x)

    with mc.policy(LIMIT):
        rep = mc.inspect(Outer(), torch.randn(1, 8, 16))
    assert rep.sites[0].location.startswith("blocks.0 ("), rep.sites[0].location


def test_muse_backend_and_pass_uuid():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    q, k, v = _qkv(H=2, Hkv=2, N=12, M=12, dtype=torch.float32)
    with mc.policy(LIMIT):
        out = torch.compile(f, backend="muse")(q, k, v)      # Inductor after the rewrite
    assert torch.allclose(out, f(q, k, v), atol=1e-5)
    p1, p2 = mc.MusePass(LIMIT), mc.MusePass(LIMIT.replace(clusters=32))
    assert p1.uuid() != p2.uuid() and p1.uuid() == mc.MusePass(LIMIT).uuid()
    torch._dynamo.reset()
    g = torch.compile(f, options={"pre_grad_custom_pass": p1, "fx_graph_cache": False})
    assert torch.allclose(g(q, k, v), f(q, k, v), atol=1e-5)
    # (with Inductor's caches on, a cache hit keyed by uuid() may skip the pass: records stay empty)
    assert p1.records and p1.records[0].sites[0].decision == "rewritten"


def test_optimize_keeps_identity():
    model = TinyLM()
    om = mc.optimize(model, backend="eager")
    assert set(om.state_dict()) == set(model.state_dict())
    assert om.h == 4                                      # attribute passthrough
    with pytest.raises(ValueError):
        mc.optimize(model, policy={"min_context": 1})


def test_optimize_passes_mode_and_options_to_inductor():
    """``mode`` / ``options`` of torch.compile reach Inductor (which runs inside the muse backend), and the
    rewrite still happens; with another inner backend they are refused up front."""
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    q, k, v = _qkv(H=2, Hkv=2, N=12, M=12, dtype=torch.float32)
    om = mc.optimize(f, policy=LIMIT, mode="reduce-overhead", options={"fx_graph_cache": False})
    assert torch.allclose(om(q, k, v), f(q, k, v), atol=1e-5)
    (entry,) = om._entries.values()
    assert entry.backend.config == {"triton.cudagraphs": True, "fx_graph_cache": False}
    assert entry.backend.records[0].sites[0].decision == "rewritten"
    torch._dynamo.reset()
    be = MuseBackend(LIMIT)
    g = torch.compile(f, backend=be, mode="max-autotune-no-cudagraphs")   # kwargs handed to the call
    assert torch.allclose(g(q, k, v), f(q, k, v), atol=1e-5) and be.records
    with pytest.raises(ValueError, match="configure Inductor"):
        mc.optimize(f, policy=LIMIT, mode="reduce-overhead", backend="aot_eager")
