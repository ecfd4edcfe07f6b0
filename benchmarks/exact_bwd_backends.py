"""The exact causal chunks' backward fed MuSe's final output and log-sum-exp: the flash-attention backward
against cuDNN's backward, for agreement and speed.

    python benchmarks/exact_bwd_backends.py [--n 16384] [--chunk 4096]

(``triton_muse`` tries cuDNN first since this comparison.) The MuSe backward needs, for each exact chunk, dS = P (dO·v − D) with P = exp(s − L) and D = dO·o from the final
(merged) L and o; both aten backward kernels take (out, logsumexp) as inputs. cuDNN's statistics layout
([B, H, S, 1]) is tried as well as flash's ([B, H, S]).
"""
import argparse

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    import triton
    from muse_compile.kernels import triton_muse as T
    B, H, N, D, E = 4, 8, args.n, 64, args.chunk
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    out, lse = T.muse_attention(q, k, v, causal=True, clusters=64)
    dout = torch.randn_like(out)
    s = D ** -0.5

    def ch(t):
        return t.reshape(-1, 1, E, t.shape[-1])

    def flash():
        T.EXACT_BWD_BACKENDS = ("flash",)
        try:
            return T._exact_backward_sdpa(dout, q, k, v, out, lse, s, E, None)
        finally:
            T.EXACT_BWD_BACKENDS = ("cudnn", "flash")

    ref = flash()
    # the cuDNN forward's bookkeeping outputs on a small chunk-shaped input, as autograd hands them on
    t = ch(q)[:2]
    f = torch.ops.aten._scaled_dot_product_cudnn_attention(t, t, t, None, True, 0.0, True, False, scale=s)
    print("cudnn forward outputs:", [(type(x).__name__, getattr(x, "shape", x), getattr(x, "dtype", None))
                                     for x in f])
    lse_ref = f[1]
    # which log base / layout: compare its logsumexp with ours on the same chunk (exact part = whole chunk)
    sc = (t.float() @ t.float().transpose(-1, -2)) * s
    sc = sc.masked_fill(torch.ones(E, E, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
    print("cudnn lse vs natural logsumexp:", (lse_ref.reshape(2, 1, E).float() - sc.logsumexp(-1)).abs().max().item())
    rows = []
    for name, lse_c in (("cudnn lse [.,E,1]", lse.reshape(-1, 1, E, 1).contiguous()),
                        ("cudnn lse [.,E]", lse.reshape(-1, 1, E).contiguous())):
        def cudnn(lse_c=lse_c):
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                ch(dout), ch(q), ch(k), ch(v), ch(out), lse_c, f[6], f[7], None, f[2], f[3], E, E, 0.0, True,
                scale=s)
        try:
            got = cudnn()
            err = [((a.float().reshape(b.shape) - b.float()).norm() / b.float().norm()).item()
                   for a, b in zip(got, ref)]
            ms = triton.testing.do_bench(cudnn, warmup=10, rep=50, return_mode="median")
            rows.append((name, ms, err))
        except Exception as e:  # report and go on
            rows.append((name, float("nan"), f"{type(e).__name__}: {str(e)[:160]}"))
    ms = triton.testing.do_bench(flash, warmup=10, rep=50, return_mode="median")
    print(f"B={B} H={H} N={N} D={D} chunk {E}, bf16, {torch.cuda.get_device_name()}")
    print(f"flash: {ms:.3f} ms")
    for name, t, err in rows:
        print(f"{name}: {t:.3f} ms; rel diff to flash (dq, dk, dv): {err}")


if __name__ == "__main__":
    main()
