"""Which attention masks MuSe can honour exactly, decided by evaluating the mask's own subgraph.

Masks reach attention built in many ways (``tril`` of ``ones``, a slice of a registered triangle buffer,
``arange`` comparisons and advanced indexing as Hugging Face ``masking_utils`` builds them, ``(1 - m) *
finfo.min``, ``masked_fill(~m, -inf)``, ``where(m, 0, min)``...). Rather than pattern-matching each
spelling, the analysis takes the nodes the mask is computed from and runs them on concrete values:

* leaves must be constants, buffers, sizes, or at most one runtime tensor of shape ``[B, M]`` (the
  tokenizer's ``attention_mask``); a parameter, another input, or a random op disqualifies the mask;
* the runtime tensor is replaced by probes (all ones, all zeros, several random 0/1 patterns), and the
  result, turned into an *allowed* boolean ``A[b, h, i, j]``, must factor for every probe as
  ``base[i, j] & keep[b, j]`` with ``base`` either all-true or the causal triangle (``N == M``), and be the
  same for every head;
* additive masks must be exactly 0 where allowed and ``<= -1e4`` (after any later scaling) or ``-inf``
  elsewhere, so adding them equals excluding the key for every row that keeps at least one key.

At run time the op then needs only ``keep[b, j]``, which the rewritten graph reads from the mask's last
query row (:func:`muse_compile.replacements.key_padding_from_masks`; every key is visible there under a
causal base), so no decision rests on the probe values themselves. Assumptions, stated: the ``[B, M]``
input holds 0/1 values (as tokenizers produce), and registered buffers keep the values they had at compile
time.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import _compat

__all__ = ["MaskComponent", "MaskVerdict", "analyze_masks", "NEG_THRESHOLD"]

#: an additive value at or below this (after later scaling) excludes a key exactly in fp32/fp16/bf16 math
NEG_THRESHOLD = -1.0e4

_RANDOM_OPS = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli",
               "dropout", "multinomial", "normal", "uniform_", "normal_", "bernoulli_", "randperm",
               "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}


@dataclasses.dataclass
class MaskComponent:
    """One mask applied to the scores. ``kind``: ``"keep"`` (bool, True = attend), ``"drop"`` (bool,
    True = excluded), ``"add"`` (additive float). ``fill``: the value written into excluded scores for
    keep/drop (None when given by a node that must be evaluated: ``fill_node``). ``factor``: product of the
    scalar scales applied to the scores after this mask."""

    node: fx.Node
    kind: str
    fill: Optional[float] = None
    fill_node: Optional[fx.Node] = None
    factor: float = 1.0
    key_only: bool = False   # the value is [B, M] (a key-padding mask as nn.MultiheadAttention takes it)


@dataclasses.dataclass
class MaskVerdict:
    ok: bool
    reason: str = ""
    causal: bool = False
    runtime: List[MaskComponent] = dataclasses.field(default_factory=list)  # components that carry padding


def _target_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def _inplace(n: fx.Node) -> bool:
    name = _target_name(n)
    return n.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")


def _ancestors(nodes: Sequence[fx.Node]) -> List[fx.Node]:
    """The nodes ``nodes`` are computed from, including in-place ops that mutate one of them first
    (Dynamo keeps ``x = zeros_like(m); x.masked_fill_(m, -inf)`` as two nodes, the value being ``x``)."""
    seen: Dict[fx.Node, None] = {}
    stack = list(nodes)
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)} if nodes else {}
    limit = max(order[n] for n in nodes) if nodes else 0
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = None
        stack.extend(n.all_input_nodes)
        for u in n.users:
            if u not in seen and _inplace(u) and u.args and u.args[0] is n and order[u] < limit:
                stack.append(u)
    order = {n: i for i, n in enumerate(next(iter(seen)).graph.nodes)} if seen else {}
    return sorted(seen, key=lambda n: order[n])


class _Leaves:
    def __init__(self):
        self.data: List[fx.Node] = []
        self.values: Dict[fx.Node, Any] = {}
        self.problem: str = ""


def _classify_leaves(gm: fx.GraphModule, nodes: List[fx.Node]) -> _Leaves:
    out = _Leaves()
    for n in nodes:
        if n.op == "placeholder":
            ex = _compat.placeholder_example(n)
            meta = _compat.node_example(n)
            if isinstance(meta, (torch.SymInt, torch.SymFloat, torch.SymBool)) or isinstance(ex, (int, float, bool)):
                out.values[n] = _compat.size_hint(ex if ex is not None else meta)
                continue
            if not isinstance(ex, torch.Tensor):
                out.problem = f"mask input {n.name} has no example value"
                return out
            if _compat.placeholder_is_param_or_buffer(n):
                if isinstance(ex, torch.nn.Parameter) or "_parameters" in _compat.placeholder_source(n):
                    out.problem = f"mask depends on parameter {n.name} (a learned bias)"
                    return out
                out.values[n] = ex.detach().clone()
                continue
            out.data.append(n)
            out.values[n] = ex
        elif n.op == "get_attr":
            val = gm
            for part in str(n.target).split("."):
                val = getattr(val, part)
            out.values[n] = val.detach().clone() if isinstance(val, torch.Tensor) else val
        elif n.op in ("call_function", "call_method", "call_module"):
            if _target_name(n) in _RANDOM_OPS:
                out.problem = f"mask uses random op {_target_name(n)}"
                return out
    return out


def _run(gm: fx.GraphModule, nodes: List[fx.Node], env: Dict[fx.Node, Any]) -> Dict[fx.Node, Any]:
    env = dict(env)
    for n in nodes:
        if n in env:
            continue
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            self_, *rest = args
            env[n] = getattr(self_, n.target)(*rest, **kwargs)
        elif n.op == "call_module":
            env[n] = gm.get_submodule(n.target)(*args, **kwargs)
        else:
            raise RuntimeError(f"cannot evaluate {n.op} {n.name}")
    return env


def constant_scalar(gm: fx.GraphModule, node: Any) -> Optional[float]:
    """The value of a one-element floating tensor computed in the graph from constants alone (e.g.
    ``torch.tensor(d) ** -0.5``, ``torch.sqrt(torch.tensor(d))``), else None. Anything fed by a graph input
    (an activation, a parameter, a buffer, or a symbolic size whose value is only a hint) is not constant."""
    if not isinstance(node, fx.Node):
        return None
    ex = _compat.node_example(node)
    if not isinstance(ex, torch.Tensor) or ex.numel() != 1 or not ex.is_floating_point():
        return None
    nodes = _ancestors([node])
    if any(n.op not in ("call_function", "call_method", "get_attr") for n in nodes):
        return None
    if any(n.op == "call_function" and _target_name(n) in _RANDOM_OPS for n in nodes):
        return None
    try:
        leaves = _classify_leaves(gm, nodes)
        if leaves.problem or any(isinstance(v, torch.nn.Parameter) for v in leaves.values.values()):
            return None
        val = _run(gm, nodes, leaves.values)[node]
    except Exception:
        return None
    return float(val) if isinstance(val, torch.Tensor) and val.numel() == 1 else None


def _probes(t: torch.Tensor, count: int = 4) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    shape = tuple(t.shape)
    ps = [torch.ones(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)]
    for i in range(count):
        p = torch.rand(shape, generator=g) < (0.3 + 0.15 * i)
        if p.dim() == 2 and p.shape[-1] > 1:  # a left-padded and a right-padded row pattern too
            if i == 0:
                p = torch.arange(shape[-1])[None, :].expand(shape) >= (torch.arange(shape[0])[:, None] % shape[-1])
            elif i == 1:
                p = torch.arange(shape[-1])[None, :].expand(shape) < (shape[-1] - torch.arange(shape[0])[:, None] % shape[-1])
        ps.append(p)
    return [p.to(device=t.device, dtype=t.dtype) for p in ps]


def _allowed(comp: MaskComponent, val: Any, fill: Any) -> Tuple[Optional[torch.Tensor], str]:
    """The allowed-boolean of one component's value, or (None, reason)."""
    if not isinstance(val, torch.Tensor):
        return None, f"mask {comp.node.name} is not a tensor"
    if comp.kind in ("keep", "drop"):
        if val.dtype != torch.bool:
            return None, f"boolean mask {comp.node.name} has dtype {val.dtype}"
        f = fill
        if isinstance(f, torch.Tensor):
            if f.numel() == 0 or not bool((f == f.reshape(-1)[0]).all()):
                return None, "masked_fill/where fill value is not one constant"
            f = float(f.reshape(-1)[0])
        if not isinstance(f, (int, float)):
            return None, "fill value is not a number"
        if not (f == float("-inf") or f * comp.factor <= NEG_THRESHOLD):
            return None, f"fill value {f} does not exclude keys (needs -inf or <= {NEG_THRESHOLD:g})"
        return (val if comp.kind == "keep" else ~val), ""
    # additive
    if not val.is_floating_point():
        return None, f"additive mask {comp.node.name} has dtype {val.dtype}"
    allowed = val == 0
    bad = ~allowed & ~((val == float("-inf")) | (val.double() * comp.factor <= NEG_THRESHOLD))
    if bool(bad.any()):
        return None, "additive term is not a mask (values other than 0 and large negative: a bias)"
    return allowed, ""


def _factor(A: torch.Tensor, scores_shape: Tuple[int, ...]):
    """Check A (broadcastable to scores_shape) == base & keep[b, j]. Returns (base kind, keep, reason)."""
    try:
        A = A.expand(scores_shape) if A.dim() == len(scores_shape) else A.reshape(
            (1,) * (len(scores_shape) - A.dim()) + tuple(A.shape)).expand(scores_shape)
    except RuntimeError:
        return None, None, f"mask shape does not broadcast to scores {scores_shape}"
    N, M = scores_shape[-2], scores_shape[-1]
    lead = scores_shape[:-2]
    A4 = A.reshape(lead + (N, M)) if len(lead) == 2 else A.reshape((1,) + tuple(lead) + (N, M)) \
        if len(lead) == 1 else None
    if A4 is None:
        return None, None, f"scores of rank {len(scores_shape)} not supported with masks"
    if not bool((A4 == A4[:, :1]).all()):
        return None, None, "mask differs between heads"
    keep = A4[:, 0, N - 1, :]                               # [B, M]
    full = torch.ones(N, M, dtype=torch.bool, device=A.device)
    kinds = set()
    for kind, base in (("full", full), ("causal", torch.tril(full) if N == M else None)):
        if base is None:
            continue
        if bool((A4[:, 0] == (base[None] & keep[:, None, :])).all()):
            kinds.add(kind)
    if not kinds:
        return None, None, "mask is neither causal nor key-padding (arbitrary pattern)"
    return kinds, keep, ""


def analyze_masks(gm: fx.GraphModule, comps: Sequence[MaskComponent], scores_shape: Tuple[int, ...],
                  batch_leading: bool) -> MaskVerdict:
    """Decide whether the masks ``comps`` applied to scores of ``scores_shape`` are causal and/or
    key-padding, by evaluating their subgraph on probes (see the module docstring).

    ``batch_leading``: the scores' first dim is the batch (4-D ``[B, H, N, M]``); with 3-D ``[B·H, N, M]``
    scores only constant (causal) masks are accepted.
    """
    verdict = MaskVerdict(ok=True)
    shape = tuple(int(_compat.size_hint(s)) for s in scores_shape)
    for comp in comps:
        roots = [comp.node] + ([comp.fill_node] if comp.fill_node is not None else [])
        nodes = _ancestors(roots)
        leaves = _classify_leaves(gm, nodes)
        if leaves.problem:
            return MaskVerdict(False, leaves.problem)
        if len(leaves.data) > 1:
            return MaskVerdict(False, "mask depends on several runtime tensors: "
                               + ", ".join(n.name for n in leaves.data))
        probes: List[Optional[torch.Tensor]] = [None]
        data = leaves.data[0] if leaves.data else None
        if data is not None:
            ex = leaves.values[data]
            if ex.dim() != 2 or not batch_leading or tuple(ex.shape) != (shape[0], shape[-1]):
                return MaskVerdict(False, f"mask built from runtime tensor {data.name} of shape "
                                   f"{tuple(ex.shape)} (only [B, M] key-padding inputs are understood)")
            probes = _probes(ex)
        bases = {"full", "causal"}
        padded = False
        for p in probes:
            env = dict(leaves.values)
            if data is not None:
                env[data] = p
            try:
                with torch.no_grad():
                    res = _run(gm, nodes, env)
            except Exception as e:  # noqa: BLE001 - any failure means "cannot prove"
                return MaskVerdict(False, f"mask could not be evaluated ({type(e).__name__}: {e})")
            fill = comp.fill if comp.fill_node is None else res[comp.fill_node]
            A, why = _allowed(comp, res[comp.node], fill)
            if A is None:
                return MaskVerdict(False, why)
            if comp.key_only:
                if A.dim() != 2:
                    return MaskVerdict(False, f"key_padding_mask of rank {A.dim()}")
                A = A[:, None, None, :]
            kind, keep, why = _factor(A, shape)
            if kind is None:
                return MaskVerdict(False, why)
            if data is None and not bool(keep.all()):
                return MaskVerdict(False, "constant mask hides keys from every query (not causal)")
            bases &= kind
            padded = padded or not bool(keep.all())
        if not bases:
            return MaskVerdict(False, "mask pattern changes with the padding input")
        if "full" not in bases:
            verdict.causal = True
        if data is not None:  # read at run time (the probes showed it can pad)
            verdict.runtime.append(comp)
    return verdict
