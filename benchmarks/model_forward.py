"""Forward time of a whole GPT (the pretraining benchmark's shape) at long context: exact attention under
``torch.compile`` vs ``muse_compile.optimize``, with and without CUDA graphs (``mode="reduce-overhead"``).

    python benchmarks/model_forward.py [--context 16384] [--batch 1] [--clusters 64]

Inference (no grad), bf16 autocast. Prints ms per forward and the logits' RSE against the exact model.
"""
import argparse
import time

import torch

import muse_compile as mc
from muse_compile.models import GPT, GPTConfig


def bench(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--clusters", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=6, n_head=8, n_embd=512, max_seq_len=a.context)
    model = GPT(cfg).cuda().eval()
    tokens = torch.randint(0, 256, (a.batch, a.context), device="cuda")
    pol = mc.Policy(min_context=4096, clusters=a.clusters)
    rows = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        variants = {
            "exact, torch.compile": torch.compile(model),
            "exact, torch.compile reduce-overhead": torch.compile(model, mode="reduce-overhead"),
            "muse, optimize": mc.optimize(model, policy=pol),
            "muse, optimize reduce-overhead": mc.optimize(model, policy=pol, mode="reduce-overhead"),
        }
        ref = model(tokens).float()
        for name, m in variants.items():
            t0 = time.perf_counter()
            out = m(tokens).float().clone()
            comp = time.perf_counter() - t0
            ms = bench(lambda: m(tokens))
            rows[name] = (ms, float(mc.relative_squared_error(out, ref)), comp)
    print(f"GPT 6x512, 8 heads of 64, context {a.context}, batch {a.batch}, bf16 autocast, inference; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}; policy {pol}")
    print("| variant | ms / forward | logits RSE vs eager exact | first call s |")
    print("|---|---|---|---|")
    for name, (ms, rse, comp) in rows.items():
        print(f"| {name} | {ms:.2f} | {rse:.2e} | {comp:.1f} |")


if __name__ == "__main__":
    main()
