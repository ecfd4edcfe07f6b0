"""Compile time of ``mc.optimize`` vs plain ``torch.compile`` on a 4-layer GPT (CPU or GPU).

Each measurement runs in a fresh subprocess with an empty Inductor cache directory and the FX-graph /
AOTAutograd caches off, so every run compiles from scratch (Dynamo + AOTAutograd + Inductor codegen +
C++/Triton compilation). Reported: wall time of the first call (compile + one run) minus the median of
later calls. Three variants: ``plain`` (torch.compile, Inductor), ``muse-rewritten`` (optimize with a
policy that rewrites all 4 attention sites), ``muse-kept`` (optimize, min_context above the length: the
pass runs but keeps every site).

    python benchmarks/compile_time.py                # 2 repeats per variant, prints a markdown table
    python benchmarks/compile_time.py --repeats 3 --seq 512
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(variant: str, seq: int, batch: int) -> None:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torch._inductor.config as icfg

    import muse_compile as mc

    icfg.fx_graph_cache = False
    if hasattr(icfg, "autograd_cache"):
        icfg.autograd_cache = False
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.h = h
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q, k, v = (t.view(b, n, self.h, d // self.h).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self, vocab=1000, d=256, h=4, layers=4, ctx=4096):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

        def forward(self, ids):
            x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln(x))

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT().to(dev).eval()
    ids = torch.randint(0, 1000, (batch, seq), device=dev)
    if variant == "plain":
        cm = torch.compile(model)
        ctx = mc.policy()
    else:
        cm = mc.optimize(model)
        ctx = mc.policy(min_context=16 if variant == "muse-rewritten" else 10 ** 9, clusters=64)
    with torch.no_grad(), ctx:
        t0 = time.perf_counter()
        cm(ids)
        if dev == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            cm(ids)
            if dev == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
    rewritten = pass_s = None
    if variant != "plain":
        recs = [r for e in cm._entries.values() for r in e.backend.records]
        rewritten = sum(s.decision == "rewritten" for r in recs for s in r.sites)
        pass_s = sum(e.backend.pass_seconds for e in cm._entries.values())
    print(json.dumps({"variant": variant, "first": first, "run": statistics.median(runs), "rewritten": rewritten,
                      "pass": pass_s,
                      "torch": torch.__version__, "device": dev}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.seq, a.batch)
        return
    results = {}
    for rep in range(a.repeats):
        for variant in ("plain", "muse-kept", "muse-rewritten"):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
                out = subprocess.run([sys.executable, __file__, "--child", variant, "--seq", str(a.seq),
                                      "--batch", str(a.batch)], env=env, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.setdefault(variant, []).append(res)
            print(f"# {variant} repeat {rep}: first call {res['first']:.2f} s, run {res['run'] * 1e3:.1f} ms",
                  file=sys.stderr)
    base = statistics.median(r["first"] - r["run"] for r in results["plain"])
    info = results["plain"][0]
    print(f"4-layer GPT (d=256, 4 heads, causal SDPA), batch {a.batch}, seq {a.seq}, inference, "
          f"torch {info['torch']}, {info['device']}, {a.repeats} cold runs each (median)\n")
    print("| variant | sites rewritten | compile time (s), median | runs (s) | vs plain | muse pass itself (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant, rs in results.items():
        cs = [r["first"] - r["run"] for r in rs]
        c = statistics.median(cs)
        rw = rs[0]["rewritten"]
        ps = "-" if rs[0]["pass"] is None else f"{statistics.median(r['pass'] for r in rs):.2f}"
        print(f"| {variant} | {'-' if rw is None else rw} | {c:.2f} | {', '.join(f'{x:.1f}' for x in cs)} | "
              f"{c / base:.2f}x | {ps} |")


if __name__ == "__main__":
    main()
