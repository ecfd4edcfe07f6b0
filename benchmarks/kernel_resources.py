"""Shared memory, registers and spills of every kernel launch one MuSe call makes, compiled ahead of time for
sm_90 on any machine (no GPU needed: Triton's bundled ptxas).

The forward (and with ``--backward`` the Triton backward) runs on CPU tensors with the GPU plan while every
Triton launch is recorded instead of run; each recorded launch is then compiled for sm_90 with exactly the
argument types, constexprs and warps the call would use. A launch whose shared memory exceeds the H100's
227 KiB would raise ``OutOfResources`` on the device. Compile with the device machine's Triton (3.6): shared
memory needs differ between Triton versions.

    python benchmarks/kernel_resources.py --dtype bf16 --head-dim 64 --clusters 64 [--causal] [--backward]
    python benchmarks/kernel_resources.py --grid          # the shapes the plan claims to support, one line each
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # the GPU plan and JIT kernels, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SMEM_LIMIT = 227 * 1024        # sm_90 (H100, H200): the most shared memory one block may use
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
       torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    return dict(regs=int(m.group(1)), stack=int(m.group(2))) if m else {}


@contextlib.contextmanager
def recording(launches: list):
    """Triton launches append ``(kernel, args, constexpr/option kwargs)`` to ``launches`` instead of running."""
    orig = JITFunction.__getitem__

    def getitem(self, grid):
        def launch(*args, **kw):
            launches.append((self, args, kw))
        return launch
    JITFunction.__getitem__ = getitem
    try:
        yield launches
    finally:
        JITFunction.__getitem__ = orig


def compile_launch(fn, args, kw) -> dict:
    """Compile one recorded launch for sm_90 as the launch would: the same signature, constexprs, options and
    argument specialisation (pointers and integers divisible by 16, integers equal to 1) that Triton's
    launcher derives from the arguments. The specialisation matters: aligned loads are pipelined through
    shared memory, which raised stage 1's need from 32 to 49 KiB (measured on the H100 by ncu)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 128)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, options)
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return dict(name=fn.__name__, smem=k.metadata.shared, warps=kw.get("num_warps", 4),
                **_resources(k.asm["cubin"]))


def record_call(dtype, D, Dv, clusters, causal, n, backward, mask=False, heads=(1, 2, 1)):
    """The Triton launches of one forward (and, where ``backward_supported`` takes the call and ``backward``
    asks, backward) call on CPU tensors under the GPU plan: ``(launches, backward_recorded)``."""
    from muse_compile.kernels import triton_muse as T
    B, H, Hkv = heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, n, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, n, Dv, generator=g).to(dtype)
    kpm = torch.ones(B, n, dtype=torch.bool) if mask else None
    kw = dict(causal=causal, clusters=clusters, key_padding_mask=kpm)
    launches = []
    saved = (T.supports, T._exact_backward_sdpa)
    T.supports = lambda *a, **k: (True, "")             # CPU tensors: skip the device check
    T._exact_backward_sdpa = lambda *a, **k: None      # record the Triton exact-part kernels too
    try:
        with recording(launches):
            out, _lse, st = T.muse_attention(q, k, v, return_state=True, **kw)
            bwd = backward and T.backward_supported(q, k, v, **kw)
            if bwd:
                T.muse_attention_backward(torch.randn_like(out), q, k, v, saved=(out, st), **kw)
    finally:
        T.supports, T._exact_backward_sdpa = saved
    return launches, bwd


def check(dtype, D, clusters, causal, backward, n=None, mask=False, verbose=True):
    """Compile every distinct launch of one call; returns the list of launches over the limit."""
    n = n or max(4 * 64 * clusters, 1024) * (4 if causal else 1)
    launches, bwd = record_call(dtype, D, D, clusters, causal, n, backward, mask)
    if backward and not bwd and verbose:
        print("  (the Triton backward does not take this call)")
    seen, over = set(), []
    for fn, args, kw in launches:
        key = (fn.__name__, tuple(sorted((k, v) for k, v in kw.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            r = compile_launch(fn, args, kw)
        except Exception as e:   # report and go on
            print(f"  {fn.__name__:22s} FAILED {type(e).__name__}: {str(e)[:160]}")
            over.append(fn.__name__)
            continue
        flag = "  OVER" if r["smem"] > SMEM_LIMIT else ""
        if flag:
            over.append(r["name"])
        if verbose or flag:
            tiles = ",".join(f"{k}={v}" for k, v in sorted(kw.items()) if k.startswith("B") or k.endswith("warps"))
            print(f"  {r['name']:22s} smem {r['smem'] // 1024:4d} KiB  regs {r.get('regs')}  "
                  f"stack {r.get('stack')} B  [{tiles}]{flag}")
    return over


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--mask", action="store_true", help="with a key-padding mask")
    ap.add_argument("--tune", default="{}", help="plan field overrides (triton_muse.TUNE), e.g. '{\"bm_stage2\": 32}'")
    ap.add_argument("--grid-dtypes", nargs="+", default=list(DTYPES), help="with --grid: these dtypes only")
    ap.add_argument("--grid", action="store_true",
                    help="dtypes x head dims {32, 64, 96, 128, 256} x clusters {64, 128}, forward + backward")
    a = ap.parse_args()
    print(f"sm_90, triton {triton.__version__}, limit {SMEM_LIMIT // 1024} KiB")
    from muse_compile.kernels import triton_muse as T
    from muse_compile.lowering import plan as PL
    T.TUNE.update(json.loads(a.tune))
    if not a.grid:
        print(f"{a.dtype} D={a.head_dim} C={a.clusters} causal={a.causal} backward={a.backward}")
        check(DTYPES[a.dtype], a.head_dim, a.clusters, a.causal, a.backward, mask=a.mask)
        return
    for dt in a.grid_dtypes:
        for D in (32, 64, 96, 128, 256):
            for C in (64, 128):
                why = PL.gpu_limits(DTYPES[dt], 1 << 20, 1 << 20, D, D, C)
                if why:
                    print(f"{dt} D={D} C={C}: not taken by the Triton path ({why})", flush=True)
                    continue
                for causal in (False, True):
                    print(f"{dt} D={D} C={C} causal={causal}", flush=True)
                    over = check(DTYPES[dt], D, C, causal, True, verbose=False)
                    print(f"  -> {'fits' if not over else 'OVER: ' + ', '.join(sorted(set(over)))}", flush=True)


if __name__ == "__main__":
    main()
