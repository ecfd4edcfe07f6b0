"""Real model code through ``mc.optimize``: Hugging Face GPT-2 / Llama (GQA, RoPE) / BERT from small random
configs (eager and sdpa attention, with and without right/left-padded attention masks), and
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``."""
import pytest
import torch
import torch.nn as nn

import muse_compile as mc

LIMIT = mc.Policy(min_context=4, clusters=64)
N = 12


def _sites(om, pol):
    return [s for r in om._entries[pol].backend.records for s in r.sites]


def _hf_model(T, which, impl):
    torch.manual_seed(0)
    if which == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=100, bos_token_id=0,
                           eos_token_id=0, attn_implementation=impl)
        return T.GPT2Model(cfg)
    if which == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                            attn_implementation=impl)
        return T.LlamaModel(cfg)
    cfg = T.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       vocab_size=100, max_position_embeddings=64, attn_implementation=impl)
    return T.BertModel(cfg)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("which", ["gpt2", "llama", "bert"])
def test_hf_models_every_site_rewritten_and_exact(which, impl):
    T = pytest.importorskip("transformers")
    model = _hf_model(T, which, impl).eval()
    om = mc.optimize(model, backend="eager")
    ids = torch.randint(0, 100, (2, N), generator=torch.Generator().manual_seed(1))
    right = torch.ones(2, N, dtype=torch.long)
    right[0, 8:] = 0
    left = torch.ones(2, N, dtype=torch.long)
    left[1, :5] = 0
    causal = which != "bert"
    n_rec = 0
    for mask in (None, right, left):
        kw = {} if mask is None else {"attention_mask": mask}
        with torch.no_grad():
            ref = model(ids, **kw).last_hidden_state
            with mc.policy(LIMIT):
                out = om(ids, **kw).last_hidden_state
        recs = om._entries[LIMIT].backend.records
        if len(recs) > n_rec:          # a new graph for this call (else the previous one served it)
            sites = [s for r in recs[n_rec:] for s in r.sites]
        n_rec = len(recs)
        attn = [s for s in sites if s.kind != "softmax"]
        assert len(attn) == 2 and all(s.decision == "rewritten" for s in attn), \
            [(s.kind, s.decision, s.reason) for s in sites]
        assert all(s.causal == causal for s in attn)
        if mask is not None and not (causal and mask is right):
            assert all(s.key_padding for s in attn), "padding mask not passed to the op"
        if which == "llama":
            assert all(s.kv_shape[1] == 2 for s in attn), "GQA k/v were repeated"
        valid = torch.ones(2, N, dtype=torch.bool) if mask is None else mask.bool()
        assert torch.allclose(out[valid], ref[valid], atol=5e-5), (out - ref)[valid].abs().max()


def test_hf_padding_really_reaches_the_op():
    """Approximate mode (clusters < length): keys/values at padded positions must not change any output."""
    T = pytest.importorskip("transformers")
    model = _hf_model(T, "bert", "sdpa").eval()
    attn = model.encoder.layer[0].attention.self
    seen = {}

    def grab(mod, args, kwargs, out):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

    ids = torch.randint(0, 100, (2, N), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[0, 7:] = 0
    emb = model.embeddings(ids)

    def layer(h, m):   # the [B, M] mask turned into BERT's additive extended mask inside the graph
        ext = (1.0 - m[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        return attn(h, attention_mask=ext)[0]

    om = mc.optimize(layer, backend="eager")
    h2 = emb.clone()
    h2[0, 7:] += torch.randn_like(h2[0, 7:])     # perturb padded positions (their q, k and v)
    with torch.no_grad(), mc.policy(min_context=4, clusters=3, query_clusters=12):
        a = om(emb, mask)
        b = om(h2, mask)
    sites = _sites(om, mc.Policy(min_context=4, clusters=3, query_clusters=12))
    assert sites[0].decision == "rewritten" and sites[0].key_padding
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6), (a[0, :7] - b[0, :7]).abs().max()
    assert not torch.allclose(a[0, 7:], b[0, 7:], atol=1e-3)   # the perturbation itself is visible


@pytest.mark.parametrize("training", [False, True])
def test_transformer_encoder_layer_and_mha(training):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    layer.train(training)
    x = torch.randn(2, N, 16)
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[1, 9:] = True                                       # True = ignore (PyTorch convention)
    causal = nn.Transformer.generate_square_subsequent_mask(N)
    om = mc.optimize(layer, backend="aot_eager")
    before = torch.backends.mha.get_fastpath_enabled()
    for kw, is_causal in (({}, False), ({"src_key_padding_mask": kpm}, False),
                          ({"src_mask": causal, "is_causal": True}, True)):
        with torch.set_grad_enabled(training):
            ref = layer(x, **kw)
            with mc.policy(LIMIT):
                out = om(x, **kw)
        sites = _sites(om, LIMIT)
        assert sites[-1].kind == "multihead-attention" and sites[-1].decision == "rewritten", sites
        assert sites[-1].causal == is_causal
        rows = torch.ones(2, N, dtype=torch.bool) if "src_key_padding_mask" not in kw else ~kpm
        assert torch.allclose(out[rows], ref[rows], atol=5e-5), (out - ref)[rows].abs().max()
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_mha_need_weights_is_kept():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, N, 16)

    def f(x):
        out, w = mha(x, x, x, need_weights=True)
        return out, w

    om = mc.optimize(f, backend="aot_eager")
    with mc.policy(LIMIT):
        out, w = om(x)
    s = _sites(om, LIMIT)
    assert [x.decision for x in s] == ["kept"] and "weights" in s[0].reason
    ref_out, ref_w = f(x)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(w, ref_w, atol=1e-6)


def test_mha_cross_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x, mem = torch.randn(2, N, 16), torch.randn(2, 20, 16)
    f = lambda x, m: mha(x, m, m, need_weights=False)[0]   # noqa: E731
    om = mc.optimize(f, backend="aot_eager")
    with mc.policy(LIMIT):
        out = om(x, mem)
    s = _sites(om, LIMIT)
    assert s[0].decision == "rewritten" and s[0].kv_shape[2] == 20 and not s[0].causal
    assert torch.allclose(out, f(x, mem), atol=2e-5)
