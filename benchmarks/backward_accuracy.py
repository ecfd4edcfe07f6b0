"""Accuracy of the Triton MuSe backward on the GPU against autograd of the float32 reference, on the same
(rounded) inputs: relative error and cosine similarity of dq, dk, dv, per dtype, causal and dipole switch.

    python benchmarks/backward_accuracy.py [--n 4096] [--clusters 32]

Inputs are a Gaussian mixture (tokens near a few shared directions, as real activations cluster) with
moderate logits. ``rows>1e-2`` is the share of query rows whose dq is off by more than 1% of the row's norm:
a discontinuity of the approximation (a token on the dipole's trust bound, or a k-means tie resolved
differently) shows as a few such rows rather than a uniform error.
"""
import argparse

import torch


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _mixture(B, H, Hkv, N, D, seed, modes=16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    cent = torch.randn(modes, D, device="cuda", generator=g)

    def mix(h):
        idx = torch.randint(0, modes, (B, h, N), device="cuda", generator=g)
        return cent[idx] + 0.5 * torch.randn(B, h, N, D, device="cuda", generator=g)
    return mix(H), mix(Hkv), torch.randn(B, Hkv, N, D, device="cuda", generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--diagnose-mask", action="store_true",
                    help="float32 causal with a key-padding mask (last 20%% of batch 1's keys): where dq's error sits")
    args = ap.parse_args()
    if args.diagnose_mask:
        return diagnose_mask(args)
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    B, H, Hkv, N, D = 1, 4, 2, args.n, args.d
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            for dipole in (True, False):
                q, k, v = _mixture(B, H, Hkv, N, D, seed=1)
                q, k, v = (t.to(dtype) for t in (q, k, v))
                kw = dict(causal=causal, clusters=args.clusters, dipole=dipole, block_size=args.block_size)
                dout = torch.randn(B, H, N, D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
                leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
                out, _ = R.muse_attention(*leaves, **kw)
                ref = torch.autograd.grad((out * dout).sum(), leaves)
                if not T.backward_supported(q, k, v, **kw):
                    lines.append(f"| {str(dtype)[6:]} | {causal} | {dipole} | not supported (backward_fits) |")
                    continue
                got = T.muse_attention_backward(dout.to(dtype), q, k, v, **kw)
                cells = []
                for m, r in zip(got, ref):
                    m = m.float()
                    cos = torch.nn.functional.cosine_similarity(m.flatten(), r.flatten(), dim=0).item()
                    cells.append(f"{_rel(m, r):.2e} / {cos:.5f}")
                rowerr = (got[0].float() - ref[0]).norm(dim=-1) / ref[0].norm(dim=-1).clamp(min=1e-30)
                frac = (rowerr > 1e-2).float().mean().item()
                # both against exact attention's gradient: the approximation error the optimiser sees
                lx = [t.float().requires_grad_(True) for t in (q, k, v)]
                ex = torch.autograd.grad((R.exact_attention(*lx, causal=causal) * dout).sum(), lx)
                vs = " ".join(f"{_rel(r, e):.3f}/{_rel(m.float(), e):.3f}" for r, m, e in zip(ref, got, ex))
                lines.append(f"| {str(dtype)[6:]} | {causal} | {dipole} | " + " | ".join(cells) + f" | {frac:.4f} | "
                             f"{vs} |")
                print(lines[-1], flush=True)
    print(f"\nB={B} H={H} Hkv={Hkv} N={N} D={D} C={args.clusters} block {args.block_size}; "
          f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| dtype | causal | dipole | dq rel / cos | dk rel / cos | dv rel / cos | dq rows>1e-2 | "
          "RSE vs exact grad, reference/Triton: dq dk dv |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


def diagnose_mask(args):
    from muse_compile.kernels import reference as R
    from muse_compile.kernels import triton_muse as T
    N = args.n
    for dipole in (True, False):
        # tests/test_triton_gpu.py's data: six modes 4 apart, noise 0.1, q and k scaled by 0.25
        g = torch.Generator(device="cuda").manual_seed(3)

        def sep(h):
            c = torch.randn(2, h, 6, args.d, generator=g, device="cuda") * 4
            idx = torch.randint(0, 6, (2, h, N), generator=g, device="cuda")
            return torch.gather(c, 2, idx[..., None].expand(2, h, N, args.d)) + 0.1 * torch.randn(
                2, h, N, args.d, generator=g, device="cuda")
        q, k = sep(4) * 0.25, sep(2) * 0.25
        v = torch.randn(2, 2, N, args.d, generator=g, device="cuda")
        kpm = torch.ones(2, N, dtype=torch.bool, device="cuda")
        kpm[1, int(0.8 * N):] = False
        kw = dict(causal=True, clusters=args.clusters, dipole=dipole, block_size=args.block_size,
                  key_padding_mask=kpm)
        dout = torch.randn(2, 4, N, args.d, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
        leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
        out, _ = R.muse_attention(*leaves, **kw)
        ref = torch.autograd.grad((out * dout).sum(), leaves)
        got = T.muse_attention_backward(dout, q, k, v, **kw)
        pl = T.make_plan(q, k, v, **kw)
        print(f"dipole={dipole} exact_chunk={pl.exact_chunk} levels="
              f"{[(lv.segment, lv.pairs) for lv in pl.levels]}")
        for name, m, r in zip(("dq", "dk", "dv"), got, ref):
            err = (m - r).norm(dim=-1)
            print(f"  {name}: rel {_rel(m, r):.2e}; batch0 {_rel(m[0], r[0]):.2e} batch1 {_rel(m[1], r[1]):.2e}")
            top = err.flatten().topk(8).indices
            b, h, i = (top // (err.shape[1] * N)).tolist(), ((top // N) % err.shape[1]).tolist(), (top % N).tolist()
            print("   worst rows (b, h, pos, err/rownorm):",
                  [(b[x], h[x], i[x], round((err.flatten()[top[x]] / r.norm(dim=-1).flatten()[top[x]]).item(), 4))
                   for x in range(8)])


if __name__ == "__main__":
    main()
