"""Host-side cost of one MuSe forward call (no GPU sync inside the loop), and where it goes (cProfile).

    python benchmarks/host_overhead.py [--n 8192] [--clusters 64] [--causal]

When the host takes longer per call than the GPU, eager calls are host-bound; this says by how much.
"""
import argparse
import cProfile
import pstats
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    from muse_compile.kernels import triton_muse as T
    q, k, v = (torch.randn(4, 8, a.n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fn = lambda: T.muse_attention(q, k, v, clusters=a.clusters, causal=a.causal)  # noqa: E731
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.calls):
        fn()
    host = (time.perf_counter() - t) / a.calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / a.calls
    print(f"N={a.n} C={a.clusters} causal={a.causal}: host {host * 1e3:.3f} ms/call, with the GPU {wall * 1e3:.3f} ms/call")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
