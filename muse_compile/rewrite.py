"""Policy decision per matched site, and the graph rewrite that inserts ``torch.ops.muse.attention``."""
from __future__ import annotations

import logging
import operator
from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx

from . import _compat, ops as _ops  # noqa: F401  (registers torch.ops.muse.*)
from .matcher import Candidate, find_candidates
from .policy import Policy
from .replacements import key_padding_from_masks, mha_forward
from .report import Site, _fmt_shape

__all__ = ["decide", "rewrite_graph", "IMPL"]

log = logging.getLogger("muse_compile")

#: implementation the inserted ops ask for (see muse_compile.dispatch)
IMPL = "auto"

_META_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "seq_nr")


def decide(c: Candidate, pol: Policy) -> Tuple[str, str]:
    """``("rewritten" | "kept", reason)`` for one candidate under ``pol``."""
    if not c.ok:
        return "kept", c.reason
    if not pol.enabled:
        return "kept", "policy disabled (enabled=False)"
    if c.causal and not pol.causal:
        return "kept", "causal site and policy.causal=False"
    M = c.key_length
    if isinstance(M, int):
        if M < pol.min_context:
            return "kept", f"key length {M} < min_context {pol.min_context}"
        return "rewritten", f"key length {M} >= min_context {pol.min_context}"
    if M is None:
        return "kept", "key length unknown"
    try:
        if _compat.statically_true(M < pol.min_context):
            return "kept", f"key length {M} < min_context {pol.min_context} for every size"
    except Exception:
        pass
    return "rewritten", (f"key length {M} is dynamic: exact below min_context {pol.min_context} at run time; "
                         "the backward re-runs the forward (no saved state under dynamic shapes)")


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for k in _META_KEYS:
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def _fake_value(node: fx.Node) -> None:
    """Give an inserted node Dynamo's ``example_value`` (run the target on the inputs' fake values)."""
    vals = [_compat.node_example(a) for a in node.all_input_nodes]
    try:
        from torch._guards import detect_fake_mode
        mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    except Exception:
        mode = None
    if mode is None:
        return
    try:
        args = fx.node.map_arg(node.args, _compat.node_example)
        kwargs = fx.node.map_arg(node.kwargs, _compat.node_example)
        with mode:
            if node.op == "call_method":
                val = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                val = node.target(*args, **kwargs)
        node.meta["example_value"] = val
    except Exception:
        pass


def _emit(graph: fx.Graph, anchor: fx.Node, op: str, target, args, kwargs=None) -> fx.Node:
    n = graph.create_node(op, target, tuple(args), kwargs or {})
    _copy_meta(anchor, n)
    _fake_value(n)
    return n


def _apply_tf(graph, anchor, node, tfs):
    for tf in tfs:
        name, *targs = tf
        node = _emit(graph, anchor, "call_method", name, [node] + list(targs))
    return node


def _op_args(pol: Policy):
    return (pol.clusters, pol.query_clusters, pol.dipole, pol.kmeans_iters, pol.block_size, pol.min_context, IMPL)


def _rewrite_one(gm: fx.GraphModule, c: Candidate, pol: Policy) -> fx.Node:
    g = gm.graph
    anchor = c.anchor
    clusters, qc, dipole, iters, block, min_ctx, impl = _op_args(pol)
    with g.inserting_before(anchor):
        if c.mha is not None:
            a = c.mha
            new = _emit(g, anchor, "call_function", mha_forward, [
                a["query"], a["key"], a["value"], a["num_heads"], a["in_proj_weight"], a["in_proj_bias"],
                a["out_proj_weight"], a["out_proj_bias"], bool(a["use_separate_proj_weight"]),
                a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"], a["key_padding_mask"], c.causal,
                clusters, qc, dipole, iters, block, min_ctx, impl])
        else:
            q = _apply_tf(g, anchor, *c.q)
            k = _apply_tf(g, anchor, *c.k)
            v = _apply_tf(g, anchor, *c.v)
            kpm = None
            if c.masks:
                kinds = tuple(m.kind for m in c.masks)
                kpm = _emit(g, anchor, "call_function", key_padding_from_masks,
                            [k, kinds] + [m.node for m in c.masks])
            keep = _ops.static_shapes(*(_compat.node_example(n) for n in (q, k, v)))
            op = _emit(g, anchor, "call_function", torch.ops.muse.attention.default, [
                q, k, v, kpm, bool(c.causal), c.scale, clusters, qc, dipole, iters, block, min_ctx, impl, keep])
            out = _emit(g, anchor, "call_function", operator.getitem, [op, 0])   # element 1: the backward's state
            new = _apply_tf(g, anchor, out, c.out_tf)
    anchor.replace_all_uses_with(new)
    _prune([anchor] + list(c.nodes))
    return new


def _pure(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method"):
        return False
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return False  # in-place
    try:
        return not n.is_impure()
    except Exception:
        return True


def _prune(nodes: List[fx.Node]) -> None:
    """Erase the replaced nodes (and producers only they used) that are now unused and side-effect free."""
    work = list(nodes)
    seen = set()
    while work:
        n = work.pop()
        if n in seen or n.graph is None:
            continue
        if len(n.users) == 0 and _pure(n):
            inputs = n.all_input_nodes
            seen.add(n)
            n.graph.erase_node(n)
            work.extend(inputs)


def rewrite_graph(gm: fx.GraphModule, pol: Policy) -> List[Site]:
    """Match, decide and rewrite ``gm`` in place under ``pol``; returns the sites (in graph order)."""
    cands = find_candidates(gm)
    sites: List[Site] = []
    for c in cands:
        decision, reason = decide(c, pol)
        if decision == "rewritten":
            try:
                _rewrite_one(gm, c, pol)
            except Exception as e:  # noqa: BLE001 - never break the user's compile
                decision, reason = "kept", f"rewrite failed ({type(e).__name__}: {e})"
                log.warning("muse_compile: rewrite of %s at %s failed: %s", c.kind,
                            getattr(c, "location", "?"), e)
        site = Site(kind=c.kind, location=getattr(c, "location", ""), q_shape=_fmt_shape(c.q_shape or None),
                    kv_shape=_fmt_shape(c.kv_shape or None), causal=bool(c.causal), decision=decision,
                    reason=reason, key_padding=bool(c.masks) or (
                        c.mha is not None and c.mha.get("key_padding_mask") is not None))
        sites.append(site)
        log.info("muse_compile: %s %s at %s q=%s kv=%s causal=%s: %s", decision, c.kind, site.location,
                 site.q_shape, site.kv_shape, site.causal, reason)
    gm.graph.lint()
    gm.recompile()
    return sites
