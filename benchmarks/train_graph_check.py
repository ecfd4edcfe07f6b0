"""Training steps of a small GPT through ``mc.optimize`` with and without ``mode="reduce-overhead"`` (CUDA
graphs): the losses agree and the graph mode's step time. A check that the op's saved state works under
Inductor's CUDA-graph trees.

    python benchmarks/train_graph_check.py --context 8192 --steps 6
"""
import argparse
import time

import torch
import torch.nn.functional as F

import muse_compile as mc
from muse_compile.models import GPT, GPTConfig


def run(mode, args):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_layer=2, n_embd=512, n_head=8, max_seq_len=args.context)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pol = mc.Policy(min_context=4096, clusters=64, block_size=256)
    om = mc.optimize(model, policy=pol, **({"mode": mode} if mode else {}))
    g = torch.Generator(device="cuda").manual_seed(1)
    data = torch.randint(0, 256, (args.steps, 1, args.context + 1), device="cuda", generator=g)
    losses, times = [], []
    for i in range(args.steps):
        x, y = data[i, :, :-1], data[i, :, 1:]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(om(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    res = {m or "default": run(m, args) for m in (None, "reduce-overhead")}
    for name, (losses, times) in res.items():
        print(f"{name:16s} losses {[round(x, 4) for x in losses]}  median step (after 3) "
              f"{1e3 * sorted(times[3:])[len(times[3:]) // 2]:.2f} ms")
    a, b = res["default"][0], res["reduce-overhead"][0]
    print("max loss difference:", max(abs(x - y) for x, y in zip(a, b)))


if __name__ == "__main__":
    main()
