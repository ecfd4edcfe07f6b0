"""GPU diagnosis of the Triton MuSe forward against the reference (fp32), stage by stage.

    python benchmarks/gpu_check.py [--causal] [--n 1500] [--dtype float32]

Runs the shape of tests/test_triton_gpu.py::test_matches_reference and prints: the kernel's relative error
against the reference; run-to-run spread of the kernel; how many k-means assignments (queries, keys) differ
from the reference's; the error against the reference run on the kernel's own assignments (so assignment
flips are taken out); stage-1 summaries and the guard's λ terms against the reference computed from the
kernel's centroids, directions and assignments.
"""
import argparse
import time

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: run with TRITON_INTERPRET=1


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _separated(B, H, N, D, modes, gen, spread=4.0, noise=0.1):
    c = torch.randn(B, H, modes, D, generator=gen, device=DEV) * spread
    idx = torch.randint(0, modes, (B, H, N), generator=gen, device=DEV)
    return torch.gather(c, 2, idx[..., None].expand(B, H, N, D)) + noise * torch.randn(
        B, H, N, D, generator=gen, device=DEV)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    dtype = getattr(torch, args.dtype)
    B, H, Hkv, N, D = 2, 4, 2, args.n, 64
    gen = torch.Generator(device=DEV).manual_seed(args.seed)
    q = _separated(B, H, N, D, 6, gen)
    k = _separated(B, Hkv, N, D, 6, gen)
    v = torch.randn(B, Hkv, N, D, generator=gen, device=DEV)
    q, k, v = q.to(dtype) * 0.25, k.to(dtype) * 0.25, v.to(dtype)
    kpm = torch.ones(B, N, dtype=torch.bool, device=DEV)
    kpm[1, int(0.8 * N):] = False
    kw = dict(causal=args.causal, clusters=4, kmeans_iters=2, block_size=32, key_padding_mask=kpm)
    t0 = time.time()
    T._DEBUG = {}
    o, l = T.muse_attention(q, k, v, **kw)
    torch.cuda.synchronize() if DEV == "cuda" else None
    print(f"first call (compile) {time.time() - t0:.1f} s")
    dbg = dict(T._DEBUG)
    T._DEBUG = None
    o0, l0 = R.muse_attention(q.float(), k.float(), v.float(), **kw)
    print(f"rel err out vs reference: {_rel(o.float(), o0):.3e}  lse: "
          f"{_rel(l[torch.isfinite(l0)], l0[torch.isfinite(l0)]):.3e}")
    per = ((o.float() - o0).norm(dim=-1) / o0.norm(dim=-1).clamp(min=1e-9)).amax(-1)
    print("max row rel err per (b, h):", [f"{x:.1e}" for x in per.flatten().tolist()])
    spread = 0.0
    for _ in range(3):
        o2, _ = T.muse_attention(q, k, v, **kw)
        spread = max(spread, _rel(o2.float(), o.float()))
    print(f"run-to-run spread of the kernel: {spread:.3e}")
    if args.causal:
        return
    # assignments: kernel vs reference k-means
    Z, G = B * Hkv, H // Hkv
    s = D ** -0.5
    qs = (q.float() * s).reshape(Z, G, N, D)
    kf = k.float().reshape(Z, N, D)
    vf = v.float().reshape(Z, N, D)
    valid = kpm[:, None, :].expand(B, Hkv, N).reshape(Z, N)
    qa_ref, qmu_ref = R.kmeans(qs, 4, 2)
    ka_ref, kmu_ref = R.kmeans(kf, 4, 2, valid=valid)
    qa = dbg["qassign"].view(Z, G, N).long()
    ka = dbg["kassign"].view(Z, N).long()
    print(f"query assignment mismatches: {(qa != qa_ref).sum().item()} / {qa.numel()}; "
          f"key assignment mismatches: {(ka != ka_ref).sum().item()} / {ka.numel()}")
    # the reference on the kernel's assignments
    real_kmeans = R.kmeans

    def forced(x, clusters, iters, valid=None):
        a, mu = real_kmeans(x, clusters, iters, valid=valid)
        if x.dim() == 4:
            return qa.clone(), mu
        return ka.clone(), mu
    R.kmeans = forced
    try:
        o1, _ = R.muse_attention(q.float(), k.float(), v.float(), **kw)
    finally:
        R.kmeans = real_kmeans
    print(f"rel err vs reference on the kernel's assignments: {_rel(o.float(), o1):.3e}")
    # stage 1 from the kernel's centroids / directions / key assignments
    BD = 64
    A = G * 4
    qbar = dbg["qbar"].view(Z, G, 4, BD)[..., :D].reshape(Z, A, D)
    u = dbg["u"].view(Z, G, 4, BD)[..., :D].reshape(Z, A, D)
    qbar_ref, _ = R._query_centroids(qs, qa, qmu_ref)
    print(f"qbar vs reference (same assignments): {_rel(qbar, qbar_ref.reshape(Z, A, D)):.3e}")
    u_ref = R._dipole_directions(qs, qa, qbar.view(Z, G, 4, D))
    print(f"u vs reference: {_rel(u, u_ref.reshape(Z, A, D)):.3e}")
    sm = R.tilted_summaries(qbar, kf, vf, ka, 4, u=u)
    kt = dbg["kt"].view(Z, A, 4, BD)[..., :D]
    vt = dbg["vt"].view(Z, A, 4, BD)[..., :D]
    beta = dbg["beta"].view(Z, A, 4)
    gs = dbg["gs"].view(Z, A, 4, BD)[..., :D]
    sig = dbg["sig"].view(Z, A, 4)
    fin = torch.isfinite(sm.beta)
    print(f"stage 1: kt {_rel(kt, sm.kt):.3e} vt {_rel(vt, sm.vt):.3e} beta {_rel(beta[fin], sm.beta[fin]):.3e} "
          f"g {_rel(gs, sm.g):.3e} sigma {_rel(sig, sm.sigma):.3e}")
    lam = R._dipole_scale(qs, qa + (torch.arange(G, device=DEV) * 4).view(1, G, 1), kf, vf, valid, sm, qbar, u)
    nd = dbg["numden"].view(Z, G, 2)
    lk = torch.where(nd[..., 1] > 0, nd[..., 0] / nd[..., 1].clamp(min=1e-30), torch.zeros_like(nd[..., 0])).clamp(0, 1)
    print("lambda kernel:", [f"{x:.4f}" for x in lk.flatten().tolist()])
    print("lambda ref:   ", [f"{x:.4f}" for x in lam.flatten().tolist()])


if __name__ == "__main__":
    main()
