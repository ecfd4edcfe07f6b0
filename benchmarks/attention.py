"""Forward benchmark: MuSe (Triton) vs cuDNN / flash SDPA / FlexAttention, bf16, B·H = 32.

    python benchmarks/attention.py --n 2048 4096 8192 16384 32768 65536 --d 64 128 --mode both \
        --out benchmarks/results

Prints a table; writes ``attention.json`` and ``attention.png`` under ``--out``. For each (N, D, causal):
MuSe ms (median of ``triton.testing.do_bench``) and a breakdown by phase (cumulative runs with later phases
switched off: local = exact causal chunks, cluster = k-means + sorts + centroids/directions, stage1 = summaries
+ dipole guard, stage2 = summary attention + LSE merge, cast), MuSe replayed from a CUDA graph, cuDNN and
flash SDPA (backends forced), FlexAttention (compiled), speedup vs cuDNN, RSE against exact attention in
float64 on a sample of query rows (Gaussian-mixture input and i.i.d. Gaussian input), peak extra memory.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from muse_compile.testing import shared_mixture_qkv


def make_inputs(kind, B, H, N, D, seed, dtype=torch.bfloat16):
    if kind == "mixture":
        # queries and keys share the mixture's centres (semantic clusters)
        return shared_mixture_qkv(B, H, N, D, seed=seed, dtype=dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, device="cuda")
    k = torch.randn(B, H, N, D, generator=gen, device="cuda")
    v = torch.randn(B, H, N, D, generator=gen, device="cuda")
    return q.to(dtype), k.to(dtype), v.to(dtype)


@torch.no_grad()
def rse_sampled(out, q, k, v, causal, rows=512):
    """RSE of ``out`` against float64 exact attention on ``rows`` evenly spaced query rows (all heads)."""
    B, H, N, D = q.shape
    pos = torch.linspace(0, N - 1, rows, device=q.device).round().long().unique()
    num = den = 0.0
    for b in range(B):
        for h in range(H):
            qs = q[b, h, pos].double() * D ** -0.5
            logits = qs @ k[b, h].double().T
            if causal:
                logits = logits.masked_fill(torch.arange(N, device=q.device)[None, :] > pos[:, None], float("-inf"))
            ex = torch.softmax(logits, -1) @ v[b, h].double()
            num += (out[b, h, pos].double() - ex).pow(2).sum().item()
            den += ex.pow(2).sum().item()
    return num / den


def bench(fn, warmup=25, rep=100):
    import triton
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_bench(fn):
    """Median ms of replaying ``fn`` captured in a CUDA graph (launch overheads removed)."""
    import triton
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--mode", choices=["acausal", "causal", "both"], default="both")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--clusters", type=int, default=128)
    ap.add_argument("--clusters-for", type=str, default="",
                    help="per-N cluster counts, e.g. '8192:64,16384:64' (overrides --clusters)")
    ap.add_argument("--query-clusters", type=int, default=None)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--no-dipole", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--rse-rows", type=int, default=256)
    ap.add_argument("--backward", action="store_true",
                    help="also time forward + backward: MuSe's Triton backward on the forward's saved state "
                         "(called directly, whatever BACKWARD_ON_GPU says; also with a forward re-run) vs cuDNN "
                         "SDPA forward + backward")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from muse_compile.kernels.triton_muse import muse_attention, muse_attention_backward, make_plan
    from muse_compile.lowering.plan import describe

    os.makedirs(args.out, exist_ok=True)
    per_n = {}
    if args.clusters_for:
        for item in args.clusters_for.split(","):
            a, b = item.split(":")
            per_n[int(a)] = int(b)
    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # pragma: no cover
            print("flex unavailable:", e)
    modes = {"acausal": [False], "causal": [True], "both": [False, True]}[args.mode]
    B, H = args.batch, args.heads
    rows = []
    dev = torch.cuda.get_device_name()
    for D in args.d:
        for causal in modes:
            for N in args.n:
                C = per_n.get(N, args.clusters)
                kw = dict(causal=causal, clusters=C, query_clusters=args.query_clusters, dipole=not args.no_dipole,
                          kmeans_iters=args.iters, block_size=args.block_size)
                row = dict(N=N, D=D, causal=causal, B=B, H=H, clusters=C, query_clusters=args.query_clusters,
                           dipole=not args.no_dipole, kmeans_iters=args.iters, block_size=args.block_size)
                q, k, v = make_inputs("mixture", B, H, N, D, seed=N + D)
                fn = lambda: muse_attention(q, k, v, **kw)  # noqa: E731
                out, _ = fn()
                torch.cuda.synchronize()
                row["nan"] = bool(out.isnan().any().item())
                row["plan"] = describe(make_plan(q, k, v, **{x: kw[x] for x in kw}))
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                row["muse_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                row["muse_ms"] = bench(fn)
                if not args.no_graph:
                    try:
                        row["muse_graph_ms"] = graph_bench(fn)
                    except Exception as e:
                        row["muse_graph_ms"] = None
                        print("graph capture failed:", type(e).__name__, e)
                if not args.no_breakdown:
                    order = ["local", "cluster", "stage1", "stage2", "cast"] if causal else ["cluster", "stage1", "stage2"]
                    cum, prev = {}, 0.0
                    for i, ph in enumerate(order):
                        phs = frozenset(order[:i + 1])
                        t = bench(lambda: muse_attention(q, k, v, _phases=phs, **kw))
                        cum[ph] = max(t - prev, 0.0)
                        prev = t
                    row["breakdown_ms"] = cum
                row["rse_mixture"] = rse_sampled(out.float(), q, k, v, causal, args.rse_rows)
                qi, ki, vi = make_inputs("iid", B, H, N, D, seed=7 * N + D)
                oi, _ = muse_attention(qi, ki, vi, **kw)
                row["rse_iid"] = rse_sampled(oi.float(), qi, ki, vi, causal, args.rse_rows)
                del qi, ki, vi, oi
                for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                    try:
                        with sdpa_kernel([be]):
                            f2 = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                            f2()
                            row[f"{name}_ms"] = bench(f2)
                    except Exception as e:
                        row[f"{name}_ms"] = None
                        print(f"{name} failed:", type(e).__name__, str(e)[:200])
                if flex is not None:
                    try:
                        bm = None
                        if causal:
                            bm = create_block_mask(lambda b, h, qi_, ki_: qi_ >= ki_, None, None, N, N, device="cuda")
                        f3 = lambda: flex(q, k, v, block_mask=bm)  # noqa: E731
                        f3()
                        row["flex_ms"] = bench(f3)
                    except Exception as e:
                        row["flex_ms"] = None
                        print("flex failed:", type(e).__name__, str(e)[:200])
                if args.backward:
                    dout = torch.randn_like(out)

                    def muse_fb():      # as autograd runs the op: the backward reads the forward's state
                        o, _, st = muse_attention(q, k, v, return_state=True, **kw)
                        return muse_attention_backward(dout, q, k, v, saved=(o, st), **kw)

                    def muse_fb_rerun():  # the backward re-running the forward (round 5's op)
                        muse_attention(q, k, v, **kw)
                        return muse_attention_backward(dout, q, k, v, **kw)
                    try:
                        muse_fb()
                        row["muse_fwd_bwd_ms"] = bench(muse_fb)
                        row["muse_fwd_bwd_rerun_ms"] = bench(muse_fb_rerun)
                        row["muse_state_mib"] = make_plan(q, k, v, **kw).state_bytes / 2 ** 20
                    except Exception as e:
                        row["muse_fwd_bwd_ms"] = None
                        print("muse backward failed:", type(e).__name__, str(e)[:200])
                    if not args.no_graph and row["muse_fwd_bwd_ms"]:
                        try:
                            row["muse_fwd_bwd_graph_ms"] = graph_bench(muse_fb)
                        except Exception as e:
                            row["muse_fwd_bwd_graph_ms"] = None
                            print("muse fwd+bwd graph failed:", type(e).__name__, str(e)[:200])
                    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
                    try:
                        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                            def cudnn_fb():
                                o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
                                return torch.autograd.grad(o, (qg, kg, vg), dout)
                            cudnn_fb()
                            row["cudnn_fwd_bwd_ms"] = bench(cudnn_fb)
                    except Exception as e:
                        row["cudnn_fwd_bwd_ms"] = None
                        print("cudnn backward failed:", type(e).__name__, str(e)[:200])
                    if row.get("muse_fwd_bwd_ms") and row.get("cudnn_fwd_bwd_ms"):
                        row["fwd_bwd_speedup_vs_cudnn"] = row["cudnn_fwd_bwd_ms"] / row["muse_fwd_bwd_ms"]
                        if row.get("muse_fwd_bwd_graph_ms"):
                            row["fwd_bwd_graph_speedup_vs_cudnn"] = (row["cudnn_fwd_bwd_ms"]
                                                                     / row["muse_fwd_bwd_graph_ms"])
                    del dout, qg, kg, vg
                if row.get("cudnn_ms"):
                    row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["muse_ms"]
                    if row.get("muse_graph_ms"):
                        row["graph_speedup_vs_cudnn"] = row["cudnn_ms"] / row["muse_graph_ms"]
                rows.append(row)
                print(json.dumps({x: row[x] for x in row if x != "plan"}), flush=True)
                del q, k, v, out
                torch.cuda.empty_cache()

    meta = dict(device=dev, torch=torch.__version__, date=datetime.date.today().isoformat(),
                command="python " + " ".join(sys.argv), cudnn=torch.backends.cudnn.version())
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        pass
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    _plot(rows, os.path.join(args.out, "attention.png"), meta)
    print()
    print(f"device: {dev}; torch {torch.__version__}; B={B} H={H} bf16 forward; {meta['date']}")
    print(table(rows))
    if args.backward:
        print()
        print("| N | D | causal | C | MuSe fwd+bwd ms | re-run ms | state MiB | graph ms | cuDNN fwd+bwd ms | "
              "speedup | graph speedup |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            f = lambda x, nd=3: "-" if x is None else f"{x:.{nd}f}"  # noqa: E731
            print(f"| {r['N']} | {r['D']} | {'yes' if r['causal'] else 'no'} | {r['clusters']} | "
                  f"{f(r.get('muse_fwd_bwd_ms'))} | {f(r.get('muse_fwd_bwd_rerun_ms'))} | "
                  f"{f(r.get('muse_state_mib'), 1)} | {f(r.get('muse_fwd_bwd_graph_ms'))} | "
                  f"{f(r.get('cudnn_fwd_bwd_ms'))} | {f(r.get('fwd_bwd_speedup_vs_cudnn'), 2)} | "
                  f"{f(r.get('fwd_bwd_graph_speedup_vs_cudnn'), 2)} |")


def table(rows):
    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"
    hdr = ("| N | D | causal | C | MuSe ms | graph ms | cluster | stage1 | stage2 | local | cuDNN ms | flash ms | "
           "flex ms | speedup | graph speedup | RSE mix | RSE iid | peak MiB |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        bd = r.get("breakdown_ms", {})
        lines.append(
            f"| {r['N']} | {r['D']} | {'yes' if r['causal'] else 'no'} | {r['clusters']} | {f(r['muse_ms'])} | "
            f"{f(r.get('muse_graph_ms'))} | {f(bd.get('cluster'))} | {f(bd.get('stage1'))} | "
            f"{f(bd.get('stage2'))} | {f(bd.get('local'))} | {f(r.get('cudnn_ms'))} | {f(r.get('flash_ms'))} | "
            f"{f(r.get('flex_ms'))} | {f(r.get('speedup_vs_cudnn'), 2)} | {f(r.get('graph_speedup_vs_cudnn'), 2)} | "
            f"{f(r['rse_mixture'], 4)} | {f(r['rse_iid'], 3)} | {f(r['muse_peak_extra_mib'], 0)} |")
    return "\n".join(lines)


def _plot(rows, path, meta):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # pragma: no cover
        print("no matplotlib:", e)
        return
    keys = sorted({(r["D"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (D, causal) in zip(axes[0], keys):
        rs = sorted([r for r in rows if r["D"] == D and r["causal"] == causal], key=lambda r: r["N"])
        ns = [r["N"] for r in rs]
        for key, label in (("muse_ms", "MuSe"), ("muse_graph_ms", "MuSe (graph)"), ("cudnn_ms", "cuDNN"),
                           ("flash_ms", "flash"), ("flex_ms", "flex")):
            ys = [r.get(key) for r in rs]
            if any(y is not None for y in ys):
                ax.plot(ns, [float("nan") if y is None else y for y in ys], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_ylabel("ms (forward)")
        ax.set_title(f"D={D} {'causal' if causal else 'acausal'}")
        ax.legend()
    fig.suptitle(f"{meta['device']} bf16 B·H=32 {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
