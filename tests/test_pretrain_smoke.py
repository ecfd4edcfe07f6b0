"""CPU smoke test of benchmarks/pretrain.py: data split, both training runs, stability checks, outputs."""
import contextlib
import importlib.util
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import muse_compile as mc
from muse_compile.models import GPT, GPTConfig

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "pretrain.py")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, contended OpenMP threads make tiny steps ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def P():
    spec = importlib.util.spec_from_file_location("pretrain_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def docs(P):
    return P.collect_documents(P.corpus_roots("stdlib"))


def test_corpus_split_deterministic_and_disjoint(P, docs):
    assert len(docs) > 50 and all(k.startswith("stdlib:") for k in docs)
    assert not any(k.split(":", 1)[1] in ("site-packages", "__pycache__") for k in docs)
    tr1, va1 = P.split_documents(docs, 0.1)
    tr2, va2 = P.split_documents(dict(reversed(list(docs.items()))), 0.1)  # order of discovery must not matter
    assert sorted(tr1) == sorted(tr2) and sorted(va1) == sorted(va2)
    assert set(tr1).isdisjoint(va1) and set(tr1) | set(va1) == set(docs)
    assert va1 and tr1
    assert all(P.split_key(k) < 0.1 for k in va1)  # membership follows the name hash
    assert all(P.split_key(k) >= 0.1 for k in tr1)
    # a package's assignment depends on its name only, not on which other packages exist
    sub = {k: docs[k] for k in sorted(docs)[::3]}
    trs, vas = P.split_documents(sub, 0.1)
    assert set(vas) <= set(va1) or len(vas) == 1


def test_windows_deterministic_and_from_their_split(P, docs):
    train, val = P.split_documents(docs, 0.1)
    T = 257
    s1, s2 = P.WindowSampler(val, T), P.WindowSampler(val, T)
    a = s1.gather(s1.starts(16, torch.Generator().manual_seed(3)))
    b = s2.gather(s2.starts(16, torch.Generator().manual_seed(3)))
    c = s2.gather(s2.starts(16, torch.Generator().manual_seed(4)))
    assert a.shape == (16, T) and a.dtype == torch.int64 and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 256
    for row in a:
        for piece in bytes(row.to(torch.uint8).tolist()).split(bytes([P.SEP])):
            if len(piece) >= 16:  # every piece of a window is a contiguous part of one validation document
                assert any(piece in d for d in val.values())
    with pytest.raises(ValueError):
        P.WindowSampler({"x": b"abc", "y": b"de"}, 100)


class _NonCausalSDPA(torch.overrides.TorchFunctionMode):
    """Turns every causal SDPA call into full (bidirectional) attention: a deliberately leaky model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            kwargs["is_causal"] = False
        return func(*args, **kwargs)


class _LeakyMuse(torch.overrides.TorchFunctionMode):
    """MuSe asked for acausal attention at a causal site: leaks through the multipole path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return mc.multipole_attention(*args[:3], causal=False, clusters=4)
        return func(*args, **(kwargs or {}))


class _NextTokenCheat(nn.Module):
    """Predicts token i+1 by reading it: the shortcut the random-token check must catch."""

    def forward(self, tokens):
        return 20.0 * F.one_hot(torch.roll(tokens, -1, dims=1), 256).float()


def _tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, max_seq_len=128))


def test_leakage_check_passes_causal_and_flags_leaks(P):
    m = _tiny_gpt()
    toks = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(0))
    ok = P.causal_leakage_check(m, toks)
    assert ok["passed"] and ok["prefix_max_abs_diff"] <= ok["tolerance"] and ok["suffix_min_of_max_abs_diff"] > 0
    bad = P.causal_leakage_check(m, toks, env=_NonCausalSDPA)
    assert not bad["passed"] and bad["prefix_max_abs_diff"] > 1e-3
    bad_muse = P.causal_leakage_check(m, toks, env=_LeakyMuse)
    assert not bad_muse["passed"]
    # 1 cluster: the 64-token level runs MuSe under the schedule (exact below 64·C tokens)
    from muse_compile.lowering.schedule import causal_schedule
    assert any(not lv.exact for lv in causal_schedule(128, 16, 1))
    good_muse = P.causal_leakage_check(
        m, toks, env=lambda: P.EagerMuseAttention(mc.Policy(min_context=64, clusters=1, block_size=16)))
    assert good_muse["passed"], good_muse
    cheat = P.causal_leakage_check(_NextTokenCheat(), toks)
    assert not cheat["passed"]


def test_random_token_check(P):
    rnd = P.random_token_check(_tiny_gpt(), (2, 128), torch.device("cpu"))
    assert rnd["passed"] and abs(rnd["loss"] - math.log(256)) < 0.1  # an untrained model is near uniform
    cheat = P.random_token_check(_NextTokenCheat(), (2, 128), torch.device("cpu"))
    assert not cheat["passed"] and cheat["loss"] < 1.0


_TOY = ["--device", "cpu", "--corpus", "stdlib", "--context", "256", "--layers", "1", "--width", "64", "--heads", "2",
        "--batch", "2", "--eval-every", "2", "--val-batches", "1", "--warmup-steps", "1", "--lr-warmup", "2",
        "--clusters", "2", "--block-size", "64", "--threads", "1"]     # 2 clusters: the 128-token level is MuSe


@pytest.mark.parametrize("compile_", ["aot_eager"])
def test_pretrain_pipeline_cpu(P, tmp_path, compile_):
    """Both runs at toy size through mc.optimize (the real pass; "aot_eager" skips Inductor's codegen, which
    takes minutes on a CPU). ``--compile none`` (the eager route) is exercised by the test below."""
    from muse_compile.lowering.schedule import causal_schedule
    assert any(not lv.exact for lv in causal_schedule(256, 64, 2))     # the toy run has a MuSe level
    out = tmp_path / "out"
    P.main(_TOY + ["--steps", "4", "--min-context", "128", "--compile", compile_, "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("### Pretraining")
    assert set(data["runs"]) == {"exact", "muse"}
    ex, mu = data["runs"]["exact"], data["runs"]["muse"]
    for r in (ex, mu):
        assert r["steps_done"] == 4 and len(r["train_loss"]) == 4
        assert r["finite"] and all(math.isfinite(x) for x in r["train_loss"])
        assert [e["step"] for e in r["val"]] == [2, 4]
        assert r["leakage"]["passed"] and r["random_tokens"]["passed"]
        assert r["step_time_median_s"] > 0 and r["tokens_per_s"] > 0
    assert mu["muse_ran"] and mu["muse_impl"][0] in ("reference", "triton")
    if compile_ == "none":
        assert ex["how"] == "eager" and mu["sites_rewritten_calls"] > 0
    else:
        assert mu["how"].startswith("mc.optimize") and ex["how"].startswith("torch.compile")
        assert mu["sites"]["counts"].get("rewritten", 0) >= 1 and not mu["sites"]["counts"].get("kept")
    # the approximation is in force: losses differ a little, not at all would mean exact attention ran
    assert ex["train_loss"] != mu["train_loss"]
    # same init and same data: the first losses agree closely, and training moved the exact run
    assert abs(ex["train_loss"][0] - mu["train_loss"][0]) < 0.05
    assert ex["val"][-1]["val_loss"] < ex["val"][0]["val_loss"]  # it learns (fixed validation windows)
    s = data["summary"]
    assert s["val_at_tokens"] == 4 * 2 * 256
    assert math.isclose(s["val_rel_degradation"], (s["val_muse"] - s["val_exact"]) / s["val_exact"])
    assert data["passed"] is True
    assert data["data"]["val_packages"] and data["config"]["params"] == sum(
        p.numel() for p in GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, max_seq_len=256)).parameters())


def test_pipeline_flags_a_muse_run_that_rewrote_nothing(P, tmp_path):
    res = P.main(_TOY + ["--steps", "2", "--runs", "muse", "--min-context", "512", "--compile", "none",
                         "--out", str(tmp_path)])
    mu = res["runs"]["muse"]
    assert not mu["muse_ran"] and mu["sites_rewritten_calls"] == 0 and "muse_not_used" in mu
    assert res["passed"] is False
