"""A/B check of a kernel variant on the benchmark's inputs: the forward with two sets of plan overrides
(``triton_muse.TUNE``), on the Gaussian mixture of ``benchmarks/attention.py`` at each length, acausal and causal:
finite or not, how far the two outputs are apart, and each one's RSE against exact attention on sampled rows.

    python benchmarks/ab_check.py --n 8192 32768 --b '{"power_dot": true}'
"""
import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--a", default="{}", help="overrides of variant A (JSON)")
    ap.add_argument("--b", required=True, help="overrides of variant B (JSON)")
    ap.add_argument("--rse-rows", type=int, default=64)
    args = ap.parse_args()
    from attention import rse_sampled
    from muse_compile.kernels import triton_muse as T
    from muse_compile.testing import shared_mixture_qkv
    print("| N | causal | A finite | B finite | ‖A − B‖ / ‖A‖ | RSE A | RSE B |")
    print("|---|---|---|---|---|---|---|")
    for n in args.n:
        q, k, v = shared_mixture_qkv(4, 8, n, args.d, seed=n + args.d)
        for causal in (False, True):
            outs = []
            for tune in (args.a, args.b):
                T.TUNE.clear()
                T.TUNE.update(json.loads(tune))
                outs.append(T.muse_attention(q, k, v, causal=causal, clusters=args.clusters)[0].float())
            T.TUNE.clear()
            a, b = outs
            diff = ((a - b).norm() / a.norm()).item()
            ra, rb = (rse_sampled(o, q, k, v, causal, args.rse_rows) for o in outs)
            print(f"| {n} | {causal} | {bool(torch.isfinite(a).all())} | {bool(torch.isfinite(b).all())} | "
                  f"{diff:.2e} | {ra:.4f} | {rb:.4f} |", flush=True)


if __name__ == "__main__":
    main()
