"""Measured RSE of MuSe (PyTorch reference) against exact attention: the tables of docs/accuracy.md.

    python benchmarks/accuracy.py [--quick] [--json out.json]

Inputs come from muse_compile.testing (Gaussian mixture with 64 modes, and i.i.d. Gaussian), B=1, H=4,
D=64, float32, exact attention in float64. Prints markdown tables.
"""
import argparse
import json
import time

import torch

import muse_compile as mc
from muse_compile.kernels.reference import exact_attention
from muse_compile.testing import gaussian_mixture_qkv, gaussian_qkv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    Ns = [1024, 2048] if args.quick else [1024, 2048, 4096, 8192]
    Cs = [16, 32, 64, 128]
    rows = []
    t0 = time.time()
    for data, gen in (("mixture", gaussian_mixture_qkv), ("iid", gaussian_qkv)):
        for causal in (False, True):
            for N in Ns:
                q, k, v = gen(1, 4, N, 64, seed=N)
                e = exact_attention(q.double(), k.double(), v.double(), causal=causal)
                for C in Cs:
                    r = {"data": data, "causal": causal, "N": N, "C": C}
                    for dip in (False, True):
                        o = mc.multipole_attention(q, k, v, causal=causal, clusters=C, dipole=dip,
                                                   block_size=256, impl="reference")
                        key = "dipole" if dip else "monopole"
                        r[key] = float(mc.relative_squared_error(o, e))
                        r[key + "_centered"] = float(mc.relative_squared_error(o, e, centered=True))
                        r[key + "_worst_head"] = float(mc.relative_squared_error(o, e, dim=(-2, -1)).max())
                    rows.append(r)
    for data in ("mixture", "iid"):
        for causal in (False, True):
            print(f"\n#### {data}, {'causal (block 256)' if causal else 'acausal'}\n")
            print("| N | C | RSE monopole | RSE dipole | centred RSE monopole | centred RSE dipole | worst head (dipole) |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for r in rows:
                if r["data"] == data and r["causal"] == causal:
                    print(f"| {r['N']} | {r['C']} | {r['monopole']:.4f} | {r['dipole']:.4f} | "
                          f"{r['monopole_centered']:.4f} | {r['dipole_centered']:.4f} | {r['dipole_worst_head']:.4f} |")
    print(f"\n({time.time() - t0:.0f} s, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
