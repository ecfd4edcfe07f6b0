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
    args = ap.parse_args()
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
                lines.append(f"| {str(dtype)[6:]} | {causal} | {dipole} | " + " | ".join(cells) + f" | {frac:.4f} |")
                print(lines[-1], flush=True)
    print(f"\nB={B} H={H} Hkv={Hkv} N={N} D={D} C={args.clusters} block {args.block_size}; "
          f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| dtype | causal | dipole | dq rel / cos | dk rel / cos | dv rel / cos | dq rows>1e-2 |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
