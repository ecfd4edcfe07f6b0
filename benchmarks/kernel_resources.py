"""Registers, spills and shared memory of the generated kernels for sm_90, compiled ahead of time on any
machine (no GPU needed: Triton's bundled ptxas). A guide for block sizes and warps, not a timing.

    python benchmarks/kernel_resources.py [--dtype bf16] [--clusters 64] [--head-dim 64]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from muse_compile.lowering.codegen import KernelSpec, load


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    if not m:
        return r.stdout.strip()[-200:] + r.stderr.strip()[-200:]
    return f"regs {m.group(1)}, stack {m.group(2)} B, local {m.group(4)} B"


def compile_one(fn, types: dict, constexprs: dict, num_warps: int) -> str:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types[name]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": num_warps})
    return f"smem {k.metadata.shared} B, " + _resources(k.asm["cubin"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--ba", type=int, default=64)
    ap.add_argument("--bn1", type=int, default=64)
    ap.add_argument("--bm2", type=int, default=64)
    ap.add_argument("--bnk", type=int, default=128)
    ap.add_argument("--ba-bwd", type=int, default=64)
    ap.add_argument("--bn-bwd", type=int, default=64)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    native = a.dtype != "fp32"
    spec = KernelSpec(head_dim=a.head_dim, value_dim=a.head_dim, precision="tf32x3" if not native else "tf32",
                      dipole=True, dot_dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[a.dtype])
    mod = load(spec)
    X = "*" + a.dtype
    S = X if native else "*fp32"
    C = a.clusters
    P = dict(GS="i32", P="i32", LEN_TOT="i32", OFF="i32", PSTRIDE="i32", L="i32", HKV="i32", TSTRIDE="i32",
             NPROG="i32", scale_x="fp32", scale_q="fp32", G="i32", M_TOT="i32", K_OFF="i32", K_PSTRIDE="i32",
             LK="i32", N_TOT="i32", Q_OFF="i32", Q_PSTRIDE="i32", LF="i32", NSAMP="i32", A_OFF="i32",
             A_PSTRIDE="i32", LA="i32", N="i32", E="i32", TPP="i32", KS="i32")

    def types(**over):
        t = dict(P)
        t.update(over)
        return _Default(t)

    jobs = {
        "kmeans_pass(fit)": (mod.kmeans_pass, types(X=X), dict(C=C, BC=C, BN=a.bnk, TILES=4, MODE=1, INIT_IDX=False,
                                                               HAS_VALID=False, SUMS=True, FINAL=False,
                                                               POS_ATOMIC=True)),
        "kmeans_pass(final q)": (mod.kmeans_pass, types(X=X), dict(C=C, BC=C, BN=a.bnk, TILES=4, MODE=1,
                                                                   INIT_IDX=False, HAS_VALID=False, SUMS=True,
                                                                   FINAL=True, POS_ATOMIC=True)),
        "centroid_dir": (mod.centroid_dir, types(X=X), dict(C=C, BC=C, BN=64, POWER_ITERS=6)),
        "stage1": (mod.stage1, types(K=X, V=X, Q=X, kt_out=S, vt_out=S, g_out=S),
                   dict(CQ=C, CK=C, BCK=C, BA=a.ba, BN=a.bn1, JB=1)),
        "guard_exact": (mod.guard_exact, types(Q=X, K=X, V=X, valid_ptr="*u8"), dict(BS=64, BN=64, HAS_VALID=False)),
        "guard": (mod.guard, types(Q=X, kt=S, vt=S, gsum=S), dict(CQ=C, CK=C, BCK=C, BKS=8)),
        "stage2": (mod.stage2, types(Q=X, kt=S, vt=S, gsum=S, out=X),
                   dict(CQ=C, CK=C, BCQ=C, BCK=C, BM=a.bm2, MERGE=False)),
        "stage2_bwd": (mod.stage2_bwd, types(Q=X, kt=S, vt=S, gsum=S, dout=X),
                       dict(CQ=C, CK=C, BCQ=C, BCK=C, BM=a.bm2, GLOBAL=True)),
        # backward rows at the plan's backward tiles (KernelPlan.ba_stage1_bwd etc.)
        "stage1_bwd": (mod.stage1_bwd, types(K=X, V=X), dict(CQ=C, CK=C, BCK=C, BA=a.ba_bwd, BN=a.bn_bwd,
                                                             KV_ATOMIC=False)),
        "exact_causal_bwd_dkdv": (mod.exact_causal_bwd_dkdv, types(Q=X, K=X, V=X, valid_ptr="*u8", dout=X),
                                  dict(BM=64, BN=64, HAS_VALID=False)),
        "exact_causal_bwd_dq": (mod.exact_causal_bwd_dq, types(Q=X, K=X, V=X, valid_ptr="*u8", dout=X),
                                dict(BM=64, BN=64, HAS_VALID=False)),
        "exact_causal": (mod.exact_causal, types(Q=X, K=X, V=X, out=X, valid_ptr="*u8"),
                         dict(BM=128, BN=64, HAS_VALID=False)),
    }
    print(f"sm_90, {a.dtype}, D={a.head_dim}, C={C}, num_warps={a.warps}, triton {triton.__version__}")
    for name, (fn, t, ce) in jobs.items():
        if a.only and a.only not in name:
            continue
        try:
            print(f"{name:22s} {compile_one(fn, t, ce, a.warps)}", flush=True)
        except Exception as e:  # report and go on
            print(f"{name:22s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


class _Default(dict):
    """Argument types by name; unnamed arguments are float32 workspaces (or int32 index buffers)."""
    INT_BUFS = ("init_idx", "cnt_prev", "cnt_out", "assign_out", "pos_out", "pbase_out", "cnt", "assign", "pos",
                "pbase", "perm", "permk", "cntk", "fit_assign", "valid_ptr")
    # (float32 everywhere else: workspaces, and the backward's gradient buffers)

    def __missing__(self, key):
        if key == "valid_ptr":
            return "*u8"
        return "*i32" if key in self.INT_BUFS else "*fp32"


if __name__ == "__main__":
    main()
