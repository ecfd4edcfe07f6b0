"""Per-kernel GPU time of one MuSe forward (or, with ``--backward``, one Triton backward call on a saved
forward state; ``--rerun``: the backward re-runs the forward) by torch.profiler, optionally for several tuning
overrides.

    python benchmarks/profile_muse.py --n 8192 --clusters 64 [--causal] [--backward] [--tune '{"warps_stage": 4}' ...]
"""
import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--no-dipole", action="store_true")
    ap.add_argument("--tune", nargs="*", default=["{}"])
    ap.add_argument("--backward", action="store_true",
                    help="profile muse_attention_backward on a saved forward state instead")
    ap.add_argument("--rerun", action="store_true", help="with --backward: the backward re-runs the forward")
    ap.add_argument("--per-launch", action="store_true", help="also list every launch of one call in order")
    ap.add_argument("--compact", action="store_true", help="one line of kernel times per variant")
    ap.add_argument("--graph", action="store_true", help="also time the call replayed from a CUDA graph")
    ap.add_argument("--mixture", action="store_true",
                    help="attention.py's Gaussian-mixture inputs (uneven clusters) instead of i.i.d. Gaussian ones")
    ap.add_argument("--exact-level-factor", type=int, default=0,
                    help="override lowering.schedule.EXACT_LEVEL_FACTOR (causal levels run exact below factor·C)")
    args = ap.parse_args()
    from muse_compile.kernels import triton_muse as T
    if args.exact_level_factor:
        from muse_compile.lowering import plan as PL, schedule
        schedule.EXACT_LEVEL_FACTOR = args.exact_level_factor
        PL._plan.cache_clear()
    import triton
    g = torch.Generator(device="cuda").manual_seed(0)
    if args.mixture:
        from muse_compile.testing import shared_mixture_qkv
        q, k, v = shared_mixture_qkv(4, 8, args.n, args.d, seed=args.n + args.d)
    else:
        q, k, v = (torch.randn(4, 8, args.n, args.d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    for tune in args.tune:
        T.TUNE.clear()
        T.TUNE.update(json.loads(tune))
        kw = dict(causal=args.causal, clusters=args.clusters, dipole=not args.no_dipole)
        if args.backward:
            dout = torch.randn_like(q)
            if args.rerun:
                fn = lambda: T.muse_attention_backward(dout, q, k, v, **kw)  # noqa: E731
            else:
                o, _, st = T.muse_attention(q, k, v, return_state=True, **kw)
                fn = lambda: T.muse_attention_backward(dout, q, k, v, saved=(o, st), **kw)  # noqa: E731
        else:
            fn = lambda: T.muse_attention(q, k, v, **kw)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        gms = float("nan")
        if args.graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            gms = triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        tot = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                name = e.name.split("(")[0][:40]
                tot[name] = tot.get(name, 0.0) + e.device_time_total / 5 / 1000
        print(f"== tune={tune} N={args.n} C={args.clusters} causal={args.causal}{' backward' if args.backward else ''}{' mixture' if args.mixture else ''}: {ms:.3f} ms (do_bench median), "
              f"graph {gms:.3f} ms, kernel sum {sum(tot.values()):.3f} ms")
        if args.compact:
            print("   " + ", ".join(f"{name} {t:.4f}" for name, t in sorted(tot.items(), key=lambda x: -x[1])))
        else:
            for name, t in sorted(tot.items(), key=lambda x: -x[1]):
                print(f"   {t:8.4f} ms  {name}")
        if args.per_launch:
            evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            n1 = len(evs) // 5
            print("   one call, in launch order: " + ", ".join(
                f"{e.name.split('(')[0][:14]} {e.device_time_total / 1000:.4f}" for e in evs[:n1]))
    T.TUNE.clear()


if __name__ == "__main__":
    main()
