"""Find softmax attention in a Dynamo (torch-level) FX graph.

Three anchors, each producing a :class:`Candidate` (matched or not, always with a reason):

* ``F.scaled_dot_product_attention`` nodes (one node with every argument);
* every softmax node (``torch.softmax`` / ``F.softmax`` / ``Tensor.softmax``): walk *up* through casts,
  scalar scales and masks to ``q @ kᵀ`` (``@``, ``torch.matmul``, ``Tensor.matmul``, ``bmm``, ``einsum``),
  and *down* through casts and inactive dropout to ``p @ v``;
* ``F.multi_head_attention_forward`` nodes (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` with
  the fast path off).

Anything the walk does not understand makes the candidate "not matched" with the reason, so the site stays
exact. Masks are judged by :mod:`muse_compile.masks`.
"""
from __future__ import annotations

import dataclasses
import inspect as _inspect
import math
import operator
import re
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import _compat
from .masks import MaskComponent, analyze_masks, constant_scalar

__all__ = ["Candidate", "find_candidates"]

_SOFTMAX_FNS = {torch.softmax, F.softmax, torch.nn.functional.softmax, torch.special.softmax}
_MATMUL_FNS = {operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm}
_MUL_FNS = {operator.mul, torch.mul, torch.Tensor.mul, operator.imul}
_DIV_FNS = {operator.truediv, torch.div, torch.true_divide, torch.Tensor.div, operator.itruediv}
_ADD_FNS = {operator.add, torch.add, torch.Tensor.add, operator.iadd}
_CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type_as", "type", "contiguous"}
_DROPOUT_FNS = {F.dropout, torch.dropout, torch.nn.functional.dropout}


@dataclasses.dataclass
class Candidate:
    """A possible attention site. ``q``/``k``/``v`` are ``(node, transforms)`` to build the op's inputs;
    ``out_tf`` turns the op's ``[B, H, N, Dv]`` result into what ``anchor`` produced."""

    kind: str
    anchor: fx.Node
    ok: bool = False
    reason: str = ""
    q: Any = None
    k: Any = None
    v: Any = None
    scale: Optional[float] = None
    causal: bool = False
    masks: List[MaskComponent] = dataclasses.field(default_factory=list)
    out_tf: List[Tuple] = dataclasses.field(default_factory=list)
    q_shape: Tuple = ()
    kv_shape: Tuple = ()
    mha: Optional[dict] = None
    nodes: List[fx.Node] = dataclasses.field(default_factory=list)

    def fail(self, reason: str) -> "Candidate":
        self.ok, self.reason = False, reason
        return self

    @property
    def key_length(self):
        return self.kv_shape[-2] if len(self.kv_shape) >= 2 else None


# ------------------------------------------------------------------------------------------ helpers


def _name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _shape(n: Any) -> Optional[Tuple]:
    if not isinstance(n, fx.Node):
        return None
    ex = _compat.node_example(n)
    return tuple(ex.shape) if isinstance(ex, torch.Tensor) else None


def _dtype(n: fx.Node):
    ex = _compat.node_example(n)
    return ex.dtype if isinstance(ex, torch.Tensor) else None


def _is_call(n: Any, fns=(), methods=()) -> bool:
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_function" and n.target in fns:
        return True
    return n.op == "call_method" and n.target in methods


def _softmax_info(n: fx.Node):
    """(input, dim, dtype) for a softmax node, else None."""
    if n.op == "call_function" and n.target in _SOFTMAX_FNS:
        args, kw = list(n.args), dict(n.kwargs)
        inp = args[0] if args else kw.get("input")
        dim = args[1] if len(args) > 1 else kw.get("dim")
        dtype = kw.get("dtype", args[3] if n.target is F.softmax and len(args) > 3 else
                       args[2] if n.target is not F.softmax and len(args) > 2 else None)
        return inp, dim, dtype
    if n.op == "call_method" and n.target == "softmax":
        args, kw = list(n.args), dict(n.kwargs)
        dim = args[1] if len(args) > 1 else kw.get("dim")
        return args[0], dim, kw.get("dtype", args[2] if len(args) > 2 else None)
    return None


def _is_matmul(n: Any) -> bool:
    return _is_call(n, _MATMUL_FNS, ("matmul", "bmm", "__matmul__")) or (
        isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch.einsum)


def _matmul_operands(n: fx.Node) -> Tuple[Any, Any]:
    return n.args[0], (n.args[1] if len(n.args) > 1 else n.kwargs.get("other", n.kwargs.get("mat2")))


def _scalar(x: Any) -> Optional[float]:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _symscalar(x: Any) -> Optional[float]:
    """Example value of a graph node holding a symbolic Python scalar (SymInt/SymFloat), else None."""
    if not isinstance(x, fx.Node):
        return None
    ex = _compat.node_example(x)
    if isinstance(ex, (torch.SymInt, torch.SymFloat)):
        try:
            return float(_compat.size_hint(ex))
        except Exception:
            return None
    return None


def _users(n: fx.Node) -> List[fx.Node]:
    return list(n.users)


def _location(n: fx.Node) -> str:
    path = ""
    stack = n.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        path = re.sub(r"^L\['self'\]\.?|^L__self__\.?", "", str(path))
        path = re.sub(r"\._modules\['([^']+)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
        path = re.sub(r"^_orig_mod\.|^L\['\w+'\]\.?", "", path).lstrip(".")
        path = re.sub(r"\['([^']+)'\]", r".\1", path)
        path = re.sub(r"^G\.(?:__import_[A-Za-z0-9_]+\.)?", "", path)
    src = ""
    trace = n.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', trace)
    if frames:
        f, line, fn = frames[-1]
        parts = f.replace("\\", "/").split("/")
        src = f"{'/'.join(parts[-2:])}:{line}"
    if path and src:
        return f"{path} ({src})"
    return path or src or n.name


# ---------------------------------------------------------------------------- GQA: un-repeat k / v


def _unrepeat(n: fx.Node) -> Tuple[fx.Node, int]:
    """If ``n`` is k/v repeated over heads (``repeat_interleave(G, dim=1)`` or HF ``repeat_kv``:
    ``x[:, :, None].expand(B, Hkv, G, M, D).reshape(B, Hkv*G, M, D)``), return (x, G); else (n, 1)."""
    sh = _shape(n)
    if sh is None or len(sh) != 4:
        return n, 1
    if _is_call(n, (torch.repeat_interleave,), ("repeat_interleave",)):
        args, kw = list(n.args), dict(n.kwargs)
        x = args[0]
        reps = args[1] if len(args) > 1 else kw.get("repeats")
        dim = args[2] if len(args) > 2 else kw.get("dim")
        xs = _shape(x)
        if isinstance(reps, int) and dim in (1, -3) and xs is not None and len(xs) == 4:
            return x, reps
        return n, 1
    if _is_call(n, (torch.reshape,), ("reshape", "view")):
        e = n.args[0]
        if _is_call(e, (), ("expand",)):
            u = e.args[0]
            es, us = _shape(e), _shape(u)
            x = None
            if _is_call(u, (), ("unsqueeze",)) and (u.args[1:] == (2,) or u.kwargs.get("dim") == 2):
                x = u.args[0]
            elif _is_call(u, (operator.getitem,)):
                idx = u.args[1]
                if isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None and all(
                        isinstance(i, slice) and i == slice(None) for i in idx[:2] + idx[3:]):
                    x = u.args[0]
            xs = _shape(x)
            if x is not None and xs is not None and len(xs) == 4 and es is not None and len(es) == 5 \
                    and us is not None and us[2] == 1 and tuple(es[:2]) == tuple(xs[:2]) \
                    and tuple(es[3:]) == tuple(xs[2:]) and _same(sh[1], es[1] * es[2]):
                g = es[2]
                if isinstance(g, int):
                    return x, g
    return n, 1


def _same(a, b) -> bool:
    try:
        return _compat.statically_true(a == b) if not (isinstance(a, int) and isinstance(b, int)) else a == b
    except Exception:
        return False


def _peel_transpose(n: fx.Node) -> Optional[fx.Node]:
    """x for ``x.transpose(-2, -1)`` / ``x.mT`` / ``permute`` swapping the last two dims; else None."""
    sh = _shape(n)
    if sh is None:
        return None
    r = len(sh)
    if _is_call(n, (torch.transpose,), ("transpose",)):
        dims = sorted(d % r for d in n.args[1:3] if isinstance(d, int))
        if dims == [r - 2, r - 1]:
            return n.args[0]
    if n.op == "call_function" and n.target is getattr and n.args[1] in ("mT",):
        return n.args[0]
    if _is_call(n, (torch.permute,), ("permute",)):
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
        dims = [d % r for d in dims] if all(isinstance(d, int) for d in dims) else None
        if dims == list(range(r - 2)) + [r - 1, r - 2]:
            return n.args[0]
    return None


# ------------------------------------------------------------------------------------------- SDPA


def _sdpa(gm: fx.GraphModule, n: fx.Node) -> Candidate:
    c = Candidate("sdpa", n, nodes=[n])
    try:
        b = _inspect.signature(_sdpa_sig).bind(*n.args, **n.kwargs)
    except TypeError as e:
        return c.fail(f"unexpected SDPA arguments ({e})")
    a = b.arguments
    q, k, v = a["query"], a["key"], a["value"]
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if qs is None or ks is None or vs is None:
        return c.fail("q/k/v shapes unknown")
    c.q_shape, c.kv_shape = qs, ks
    for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
        if isinstance(a.get(name), fx.Node):
            return c.fail(f"SDPA {name} is computed at run time")
    if a.get("dropout_p", 0.0) not in (0, 0.0):
        return c.fail(f"dropout_p={a['dropout_p']} (dropout inside attention)")
    if len(qs) not in (3, 4) or len(ks) != len(qs) or len(vs) != len(qs):
        return c.fail(f"q/k/v of rank {len(qs)}/{len(ks)}/{len(vs)} (need 4-D [B, H, L, D] or 3-D)")
    causal = bool(a.get("is_causal", False))
    scale = a.get("scale")
    if scale is not None and _scalar(scale) is None:
        return c.fail("non-constant scale")
    c.scale = None if scale is None else float(scale)
    pre = [("unsqueeze", 0)] if len(qs) == 3 else []
    kx, g = _unrepeat(k)
    vx, gv = _unrepeat(v)
    if g != gv or g == 1:
        kx, vx = k, v
    H = qs[-3] if len(qs) == 4 else qs[0]
    Hk = _shape(kx)[-3] if len(qs) == 4 else ks[0]
    if g == 1 and not _same(H, Hk) and not a.get("enable_gqa", False):
        return c.fail(f"q has {H} heads, k/v {Hk} without enable_gqa")
    c.q, c.k, c.v = (q, pre), (kx, pre), (vx, pre)
    c.kv_shape = tuple(_shape(kx)[:-1]) + (vs[-1],)
    c.out_tf = [("squeeze", 0)] if len(qs) == 3 else []
    mask = a.get("attn_mask")
    if mask is not None:
        if causal:
            return c.fail("attn_mask together with is_causal")
        if not isinstance(mask, fx.Node):
            return c.fail("attn_mask is not a tensor")
        kind = "keep" if _dtype(mask) == torch.bool else "add"
        c.masks = [MaskComponent(mask, kind, fill=float("-inf"), factor=1.0)]
    if causal and not _same(qs[-2], ks[-2]):
        return c.fail("causal attention with query length != key length (top-left aligned causal)")
    return _finish_masks(gm, c, causal, qs[:-1] + (ks[-2],))


def _sdpa_sig(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    pass


def _finish_masks(gm, c: Candidate, causal: bool, scores_shape) -> Candidate:
    if c.masks:
        verdict = analyze_masks(gm, c.masks, scores_shape, batch_leading=len(scores_shape) == 4)
        if not verdict.ok:
            return c.fail(verdict.reason)
        causal = causal or verdict.causal
        c.masks = verdict.runtime
    if causal and not _same(scores_shape[-2], scores_shape[-1]):
        return c.fail("causal mask with query length != key length")
    c.causal = causal
    c.ok = True
    return c


# ------------------------------------------------------------------------------- hand-written


def _einsum_parse(n: fx.Node):
    eq = n.args[0]
    ops = n.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        return None
    return ins[0], ins[1], out, ops


def _perm(src: str, dst: str) -> Optional[List[int]]:
    if sorted(src) != sorted(dst) or len(set(src)) != len(src):
        return None
    return [src.index(ch) for ch in dst]


def _qk_operands(c: Candidate, mm: fx.Node):
    """(q node, q transforms, k node, k transforms, batch rank) for the q·kᵀ product, or a reason str."""
    if mm.op == "call_function" and mm.target is torch.einsum:
        p = _einsum_parse(mm)
        if p is None:
            return "einsum form not understood"
        a, b, out, (qn, kn) = p
        contracted = [ch for ch in a if ch in b and ch not in out]
        batch = [ch for ch in out if ch in a and ch in b]
        ns = [ch for ch in a if ch in out and ch not in b]
        ms = [ch for ch in b if ch in out and ch not in a]
        if len(contracted) != 1 or len(ns) != 1 or len(ms) != 1 or out != "".join(batch) + ns[0] + ms[0] \
                or len(a) != len(batch) + 2 or len(b) != len(batch) + 2:
            return f"einsum '{mm.args[0]}' is not a q·kᵀ product over the last dim"
        qp = _perm(a, "".join(batch) + ns[0] + contracted[0])
        kp = _perm(b, "".join(batch) + ms[0] + contracted[0])
        qtf = [] if qp == list(range(len(a))) else [("permute", tuple(qp))]
        ktf = [] if kp == list(range(len(b))) else [("permute", tuple(kp))]
        return qn, qtf, kn, ktf, len(batch)
    qn, ktn = _matmul_operands(mm)
    qs, kts = _shape(qn), _shape(ktn)
    if qs is not None and kts is not None and (len(qs) < 3 or len(kts) < 3):
        return f"not attention: softmax of a {len(qs)}-D x {len(kts)}-D matmul (a projection, not q·kᵀ)"
    if qs is None or kts is None or len(qs) != len(kts) or len(qs) not in (3, 4):
        return f"q·kᵀ operands of shapes {qs} and {kts} (need equal rank 3 or 4)"
    if not all(_same(x, y) for x, y in zip(qs[:-2], kts[:-2])):
        return f"q·kᵀ batch dims differ ({qs} vs {kts}): broadcasting matmul"
    k = _peel_transpose(ktn)
    if k is not None:
        return qn, [], k, [], len(qs) - 2
    return qn, [], ktn, [("transpose", -2, -1)], len(qs) - 2


def _handwritten(gm: fx.GraphModule, sm: fx.Node) -> Candidate:
    c = Candidate("softmax", sm, nodes=[sm])
    inp, dim, sm_dtype = _softmax_info(sm)
    ishape = _shape(inp)
    if ishape is not None:
        c.q_shape = ishape
    # ---- walk up to q @ kᵀ
    comps: List[MaskComponent] = []
    factor = 1.0
    sym: List[Tuple[str, fx.Node]] = []   # symbolic scalar scales (e.g. 1/sqrt(d) of a dynamic d): folded into q
    check_factor = 1.0                     # their example values, for the mask-strength checks only
    cur = inp
    chain = []
    while True:
        if not isinstance(cur, fx.Node):
            return c.fail("softmax input is not a graph value")
        chain.append(cur)
        if _is_matmul(cur):
            break
        if cur.op == "call_method" and cur.target in _CAST_METHODS:
            cur = cur.args[0]
            continue
        is_mul = _is_call(cur, _MUL_FNS, ("mul", "__mul__", "__rmul__"))
        if is_mul or _is_call(cur, _DIV_FNS, ("div", "__truediv__")):
            x, y = cur.args[0], cur.args[1]
            # a product may carry the scale on either side, a quotient only as the divisor; the scale is a
            # Python number, a one-element tensor computed from constants, or a symbolic size (folded into q)
            sides = ((x, y), (y, x)) if is_mul else ((x, y),)
            for other, s in sides:
                if not isinstance(other, fx.Node) or (not is_mul and cur.kwargs.get("rounding_mode")):
                    continue
                val = _scalar(s)
                if val is None:
                    val = constant_scalar(gm, s)
                if val is not None and (is_mul or val != 0):
                    factor = factor * val if is_mul else factor / val
                    cur = other
                    break
                sv = _symscalar(s)
                if sv is not None and (is_mul or sv != 0):
                    sym.append(("mul" if is_mul else "div", s))
                    check_factor = check_factor * sv if is_mul else check_factor / sv
                    cur = other
                    break
            else:
                what = "multiplication" if is_mul else "division"
                return c.fail(_why_not_attention(cur, f"{what} by a tensor between q@kᵀ and softmax"))
            continue
        if _is_call(cur, (torch.masked_fill,), ("masked_fill",)):
            x, m = cur.args[0], cur.args[1]
            val = cur.args[2] if len(cur.args) > 2 else cur.kwargs.get("value")
            comps.append(MaskComponent(m, "drop", fill=_scalar(val),
                                       fill_node=val if isinstance(val, fx.Node) else None, factor=factor * check_factor))
            cur = x
            continue
        if _is_call(cur, (torch.where,), ("where",)):
            if cur.op == "call_method":
                cond_, a_, b_ = cur.args[1], cur.args[0], cur.args[2]  # x.where(cond, y)
            else:
                if len(cur.args) != 3:
                    return c.fail("torch.where with one argument")
                cond_, a_, b_ = cur.args
            a_chain, b_chain = _on_chain(a_), _on_chain(b_)
            if a_chain and not b_chain:
                comps.append(MaskComponent(cond_, "keep", fill=_scalar(b_),
                                           fill_node=b_ if isinstance(b_, fx.Node) else None, factor=factor * check_factor))
                cur = a_
                continue
            if b_chain and not a_chain:
                comps.append(MaskComponent(cond_, "drop", fill=_scalar(a_),
                                           fill_node=a_ if isinstance(a_, fx.Node) else None, factor=factor * check_factor))
                cur = b_
                continue
            return c.fail("torch.where between q@kᵀ and softmax mixes two score tensors")
        if _is_call(cur, _ADD_FNS, ("add", "__add__", "__radd__")):
            x, y = cur.args[0], cur.args[1]
            if cur.kwargs.get("alpha", 1) != 1:
                return c.fail("add with alpha between q@kᵀ and softmax")
            xc, yc = _on_chain(x), _on_chain(y)
            if xc == yc or not isinstance(x, fx.Node) or not isinstance(y, fx.Node):
                if _scalar(x) is not None or _scalar(y) is not None:  # adding a constant: softmax-invariant
                    cur = x if isinstance(x, fx.Node) else y
                    continue
                return c.fail("score modification (sum of two score-like tensors) between q@kᵀ and softmax")
            comps.append(MaskComponent(y if xc else x, "add", factor=factor * check_factor))
            cur = x if xc else y
            continue
        return c.fail(_why_not_attention(cur, None))
    mm = cur
    # ---- softmax dim and shape
    sshape = _shape(mm)
    if sshape is None:
        return c.fail("scores shape unknown")
    r = len(sshape)
    if not isinstance(dim, int) or dim % r != r - 1:
        return c.fail(f"softmax over dim {dim}, not the key dim (-1)")
    ops = _qk_operands(c, mm)
    if isinstance(ops, str):
        return c.fail(ops)
    qn, qtf, kn, ktf, nb = ops
    if nb not in (1, 2):
        return c.fail(f"scores of rank {nb + 2}")
    c.kind = "einsum-softmax-einsum" if mm.target is torch.einsum else (
        "bmm-softmax-bmm" if _name(mm) == "bmm" else "matmul-softmax-matmul")
    # ---- walk down to p @ v
    cur = sm
    down = []
    while True:
        us = _users(cur)
        if len(us) != 1:
            return c.fail("attention probabilities are used elsewhere" if len(us) > 1 else "softmax result unused")
        u = us[0]
        if u.op == "call_method" and u.target in _CAST_METHODS:
            if u.args[0] is not cur:
                return c.fail("softmax output is not multiplied by values")
            cur = u
            down.append(u)
            continue
        if _is_call(u, _DROPOUT_FNS, ("dropout",)):
            args = list(u.args)
            kw = dict(u.kwargs)
            p = args[1] if len(args) > 1 else kw.get("p", 0.5)
            train = args[2] if len(args) > 2 else kw.get("training", kw.get("train", True))
            if isinstance(p, fx.Node) or isinstance(train, fx.Node):
                return c.fail("dropout with run-time arguments")
            if p and train:
                return c.fail(f"dropout in training (p={p})")
            cur = u
            down.append(u)
            continue
        if _is_matmul(u):
            pv = u
            break
        return c.fail(f"softmax output goes to {_name(u)}, not a matmul with values")
    # ---- values
    if pv.op == "call_function" and pv.target is torch.einsum:
        p = _einsum_parse(pv)
        if p is None or p[3][0] is not cur:
            return c.fail("values einsum not understood")
        a, b, out, (_, vn) = p
        if len(a) != nb + 2 or len(b) != nb + 2 or len(out) != nb + 2:
            return c.fail("values einsum rank mismatch")
        bl, nl, ml = a[:nb], a[nb], a[nb + 1]
        el = [ch for ch in b if ch not in a]
        if len(el) != 1 or sorted(b) != sorted(bl + ml + el[0]) or sorted(out) != sorted(bl + nl + el[0]):
            return c.fail(f"einsum '{pv.args[0]}' is not p·v")
        vp = _perm(b, bl + ml + el[0])
        vtf = [] if vp == list(range(len(b))) else [("permute", tuple(vp))]
        op_ = _perm(bl + nl + el[0], out)
        c.out_tf = [] if op_ == list(range(len(out))) else [("permute", tuple(op_))]
    else:
        a0, vn = _matmul_operands(pv)
        if a0 is not cur:
            return c.fail("probabilities are the right operand of the values matmul")
        vtf = []
    vs = _shape(vn)
    if vs is None:
        return c.fail("values shape unknown")
    # ---- assemble
    pre = [("unsqueeze", 0)] if nb == 1 else []
    kb, kg = (kn, 1) if ktf else _unrepeat(kn)
    vb, vg = (vn, 1) if vtf else _unrepeat(vn)
    if kg != vg or kg == 1:
        kb, vb = kn, vn
    c.q = (qn, qtf + pre + [tuple(sf) for sf in sym])
    c.k = (kb, ktf + pre)
    c.v = (vb, vtf + pre)
    if nb == 1:
        c.out_tf = [("squeeze", 0)] + c.out_tf
    out_dtype = _dtype(pv)
    if out_dtype is not None and _dtype(qn) is not None and out_dtype != _dtype(qn):
        c.out_tf.append(("to", out_dtype))
    if not (_dtype(qn) == _dtype(kn) == _dtype(vn)):
        return c.fail(f"q/k/v dtypes differ ({_dtype(qn)}, {_dtype(kn)}, {_dtype(vn)})")
    if factor <= 0 or check_factor <= 0:
        return c.fail(f"non-positive logit scale {factor}")
    c.scale = float(factor)
    c.masks = comps
    c.anchor = pv
    c.nodes = chain + [sm] + down + [pv]
    qd = _permuted_last(qn, qtf) if qtf else (_shape(qn) or ("?",))[-1]
    c.q_shape = ((1,) if nb == 1 else ()) + tuple(sshape[:-1]) + (qd,)
    kvh = _shape(kb)[1] if (nb == 2 and not ktf and _shape(kb) is not None) else sshape[-3] if nb == 2 else sshape[0]
    c.kv_shape = ((sshape[0], kvh) if nb == 2 else (1, kvh)) + (sshape[-1], vs[-1] if not vtf else "?")
    if vtf:
        c.kv_shape = c.kv_shape[:-1] + (_permuted_last(vn, vtf),)
    return _finish_masks(gm, c, False, sshape)


def _permuted_last(n, tf):
    sh = _shape(n)
    perm = tf[0][1]
    return sh[perm[-1]] if sh is not None else "?"


def _on_chain(x: Any) -> bool:
    """Does ``x`` lead (through score-preserving ops) to a matmul? Used to tell scores from masks."""
    seen = 0
    while isinstance(x, fx.Node) and seen < 16:
        seen += 1
        if _is_matmul(x):
            return True
        if x.op == "call_method" and x.target in _CAST_METHODS:
            x = x.args[0]
            continue
        if _is_call(x, _MUL_FNS | _DIV_FNS | _ADD_FNS, ("mul", "div", "add")):
            x = x.args[0] if isinstance(x.args[0], fx.Node) and (
                _scalar(x.args[1]) is not None or _on_chain(x.args[0])) else x.args[1]
            continue
        if _is_call(x, (torch.masked_fill,), ("masked_fill",)):
            x = x.args[0]
            continue
        if _is_call(x, (torch.where,), ("where",)):
            return any(_on_chain(a) for a in x.args[1:3]) if x.op == "call_function" else _on_chain(x.args[0])
        return False
    return False


def _why_not_attention(n: fx.Node, detail: Optional[str]) -> str:
    nm = _name(n)
    if detail:
        return detail
    if nm in ("tanh",):
        return "score modification (softcapping tanh) between q@kᵀ and softmax"
    if n.op == "placeholder":
        return f"not attention: softmax of input {n.name}"
    if nm in ("linear", "addmm", "conv1d", "conv2d", "mm"):
        return f"not attention: softmax input comes from {nm}"
    return f"not attention or score modification ({nm}) between q@kᵀ and softmax"


# ------------------------------------------------------------------------------------------ MHA


def _mha(gm: fx.GraphModule, n: fx.Node) -> Candidate:
    c = Candidate("multihead-attention", n, nodes=[n])
    try:
        b = _inspect.signature(F.multi_head_attention_forward).bind(*n.args, **n.kwargs)
    except TypeError as e:
        return c.fail(f"unexpected multi_head_attention_forward arguments ({e})")
    b.apply_defaults()
    a = dict(b.arguments)
    qs, ks = _shape(a["query"]), _shape(a["key"])
    if qs is None or ks is None or len(qs) != 3:
        return c.fail("unbatched or unknown-shape multi-head attention input")
    L, B, E = qs
    H = a["num_heads"]
    c.q_shape = (B, H, L, E // H if isinstance(E, int) and isinstance(H, int) else "?")
    c.kv_shape = (B, H, ks[0], c.q_shape[-1])
    for key in ("bias_k", "bias_v", "static_k", "static_v"):
        if a.get(key) is not None:
            return c.fail(f"multi-head attention with {key}")
    if a.get("add_zero_attn"):
        return c.fail("multi-head attention with add_zero_attn")
    if a.get("dropout_p") and a.get("training"):
        return c.fail(f"dropout in training (p={a['dropout_p']})")
    if a.get("need_weights"):
        users = [u for u in n.users if not (u.op == "call_function" and u.target is operator.getitem
                                             and u.args[1] == 0)]
        if users:
            return c.fail("attention weights returned (need_weights=True and used)")
    kpm = a.get("key_padding_mask")
    if kpm is not None and _dtype(kpm) != torch.bool:
        # nn.TransformerEncoderLayer turns a bool mask into 0/-inf floats: prove it is one
        verdict = analyze_masks(gm, [MaskComponent(kpm, "add", key_only=True)], (B, H, L, ks[0]),
                                batch_leading=True)
        if not verdict.ok:
            return c.fail(f"key_padding_mask: {verdict.reason}")
    causal = False
    am = a.get("attn_mask")
    comps = []
    if a.get("is_causal") and am is not None and kpm is None and not a.get("need_weights"):
        # F.multi_head_attention_forward itself drops attn_mask here and runs causal attention
        causal = True
    elif am is not None:
        ams = _shape(am)
        if ams is None or len(ams) != 2:
            return c.fail("per-head (3-D) attn_mask")
        comps = [MaskComponent(am, "drop" if _dtype(am) == torch.bool else "add", fill=float("-inf"))]
        verdict = analyze_masks(gm, comps, (B, H, L, ks[0]), batch_leading=True)
        if not verdict.ok:
            return c.fail(verdict.reason)
        if verdict.runtime:
            return c.fail("attn_mask depends on run-time data")
        causal = verdict.causal
    elif a.get("is_causal"):
        return c.fail("is_causal without attn_mask")
    if causal and not _same(L, ks[0]):
        return c.fail("causal mask with query length != key length")
    c.causal = causal
    c.mha = a
    c.ok = True
    return c


# ------------------------------------------------------------------------------------------ entry


def find_candidates(gm: fx.GraphModule) -> List[Candidate]:
    """Every attention-like site of ``gm`` (SDPA, softmax, MHA), each matched or not with a reason."""
    out: List[Candidate] = []
    claimed = set()
    for n in list(gm.graph.nodes):
        try:
            if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
                c = _sdpa(gm, n)
            elif n.op == "call_function" and n.target is F.multi_head_attention_forward:
                c = _mha(gm, n)
            elif _softmax_info(n) is not None:
                c = _handwritten(gm, n)
            else:
                continue
        except Exception as e:  # noqa: BLE001 - a matcher bug must never break compilation
            c = Candidate("unknown", n).fail(f"matcher error: {type(e).__name__}: {e}")
        if c.ok and any(x in claimed for x in c.nodes):
            c.fail("overlaps another site")
        if c.ok:
            claimed.update(c.nodes)
        c.location = _location(n)  # type: ignore[attr-defined]
        out.append(c)
    return out
