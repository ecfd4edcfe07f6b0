"""The main demo: a small GPT compiled with muse_compile.optimize.

    make demo            (or: python examples/demo.py [--context 2048] [--clusters 8])

Prints the inspection report (which attention sites were rewritten, and why), then the error of the
MuSe model's logits and of its attention outputs against the exact model, and the time per forward of both.
On a CPU machine MuSe runs its PyTorch reference, which is not faster than exact attention at these sizes;
the speed case is made by the Triton kernels on a GPU (docs/benchmarks.md).
"""
import argparse
import time

import torch

import muse_compile as mc
from muse_compile.models import GPT, GPTConfig


def timed(fn, reps):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=2048)
    # 8: with causal attention a level runs MuSe only for segments of >= 64·C tokens (lowering.schedule), so at
    # 2048 tokens C=8 gives MuSe levels of 512 and 1024; C=32 would leave the whole demo exact
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=128, max_seq_len=args.context)
    model = GPT(cfg).to(dev).eval()
    # real bytes as input: this file's own source, repeated to the context length
    data = open(__file__, "rb").read()
    tokens = torch.tensor(list((data * (args.context // len(data) + 1))[: args.context]), device=dev)[None]

    pol = mc.Policy(min_context=1024, clusters=args.clusters, block_size=args.block_size)
    fast = mc.optimize(model, policy=pol)
    print(f"GPT: {cfg.n_layer} layers, {cfg.n_head} heads of {cfg.n_embd // cfg.n_head}, context {args.context}, "
          f"{model.num_params() / 1e6:.1f}M parameters, device {dev}\n")
    print(mc.inspect(fast, tokens))

    with torch.no_grad():
        exact = model(tokens)
        approx = fast(tokens)
        rse = float(mc.relative_squared_error(approx, exact))
        t_exact = timed(lambda: model(tokens), args.reps)
        t_muse = timed(lambda: fast(tokens), args.reps)
        # attention alone, on the first layer's real q/k/v
        blk = model.blocks[0]
        x = blk.ln1(model.embed(tokens))
        q, k, v = blk.qkv(x).view(1, args.context, 3, cfg.n_head, -1).permute(2, 0, 3, 1, 4)
        out = mc.multipole_attention(q, k, v, causal=True, **pol.op_kwargs())
        err = mc.attention_error(out, q, k, v, causal=True)
    from muse_compile.lowering.schedule import causal_schedule
    lv = causal_schedule(args.context, args.block_size, args.clusters)
    print(f"\npolicy: {pol}")
    print(f"causal levels (segment: exact/MuSe): "
          + ", ".join(f"{x.segment}: {'exact' if x.exact else 'MuSe'}" for x in lv))
    print(f"logits RSE vs exact model:            {rse:.2e}")
    print(f"layer-0 attention RSE vs exact:       {err['rse']:.2e} (centred {err['centered_rse']:.2e})")
    print(f"forward time, exact model (eager):    {t_exact:.1f} ms")
    print(f"forward time, optimize(model):        {t_muse:.1f} ms")
    if dev == "cpu":
        print("  (CPU: MuSe runs its PyTorch reference here; the Triton kernels need a GPU, see docs/benchmarks.md)")
    with torch.no_grad():
        limit = mc.optimize(model, policy=pol.replace(clusters=args.context))(tokens)
    print(f"at the exact limit (clusters = {args.context}): max |logit diff| = "
          f"{(limit - exact).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
