"""One MuSe call between cudaProfilerStart/Stop, for Nsight Compute (ncu) to read the hardware counters of
each of its kernels (a warm-up call compiles first, outside the profiled range).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
        --section WarpStateStats python3 benchmarks/ncu_forward.py --n 8192 --clusters 64 [--causal] [--backward]
"""
import argparse

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--backward", action="store_true", help="profile the backward call on the saved state")
    a = ap.parse_args()
    from muse_compile.kernels import triton_muse as T
    from muse_compile.testing import shared_mixture_qkv
    q, k, v = shared_mixture_qkv(4, 8, a.n, a.d, seed=a.n + a.d)
    kw = dict(causal=a.causal, clusters=a.clusters)
    dout = torch.randn_like(q)
    o, _, st = T.muse_attention(q, k, v, return_state=True, **kw)      # compiles
    if a.backward:
        T.muse_attention_backward(dout, q, k, v, saved=(o, st), **kw)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    if a.backward:
        T.muse_attention_backward(dout, q, k, v, saved=(o, st), **kw)
    else:
        T.muse_attention(q, k, v, **kw)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()

if __name__ == "__main__":
    main()
