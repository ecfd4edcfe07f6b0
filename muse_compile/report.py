"""What the pass found and did: :class:`Site`, :class:`GraphRecord`, :class:`Report`, ``inspect``.

Every compiled graph leaves a :class:`GraphRecord` (its sites, and the graph code before and after the
rewrite) on the backend that compiled it; :func:`inspect` runs a model once and collects the records of the
policy in force. The same events go to ``logging.getLogger("muse_compile")`` (INFO per site).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Site", "GraphPair", "Report", "inspect"]


def _fmt_shape(s) -> Optional[Tuple]:
    if s is None:
        return None
    return tuple(x if isinstance(x, int) else str(x) for x in s)


@dataclasses.dataclass
class Site:
    """One attention site of a compiled graph and the policy's decision on it."""

    kind: str                 # "sdpa", "matmul-softmax-matmul", "bmm-softmax-bmm", "einsum-softmax-einsum",
                              # "multihead-attention", or "softmax" (a softmax that is not attention)
    location: str             # module path and source line
    q_shape: Optional[Tuple]  # [B, H, N, D] as seen by the op (symbolic sizes as strings)
    kv_shape: Optional[Tuple]  # [B, Hkv, M, Dv]
    causal: bool
    decision: str             # "rewritten" or "kept"
    reason: str
    key_padding: bool = False  # the site has a proven key-padding mask (passed to the op when rewritten)
    graph: int = 0             # index of the graph in Report.graphs

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["q_shape"] = list(self.q_shape) if self.q_shape is not None else None
        d["kv_shape"] = list(self.kv_shape) if self.kv_shape is not None else None
        return d


@dataclasses.dataclass
class GraphPair:
    """Readable code of one FX graph before and after the rewrite (``GraphModule.print_readable``)."""

    before: str
    after: str


@dataclasses.dataclass
class Report:
    sites: List[Site] = dataclasses.field(default_factory=list)
    graphs: List[GraphPair] = dataclasses.field(default_factory=list)
    policy: Any = None

    @property
    def rewritten(self) -> List[Site]:
        return [s for s in self.sites if s.decision == "rewritten"]

    @property
    def kept(self) -> List[Site]:
        return [s for s in self.sites if s.decision == "kept"]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "policy": dataclasses.asdict(self.policy) if dataclasses.is_dataclass(self.policy) else self.policy,
            "sites": [s.to_dict() for s in self.sites],
            "graphs": [dataclasses.asdict(g) for g in self.graphs],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        head = ("#", "kind", "location", "q [B,H,N,D]", "kv [B,Hkv,M,Dv]", "causal", "decision", "reason")
        rows = [head]
        for i, s in enumerate(self.sites):
            rows.append((str(i), s.kind, s.location, _shape_str(s.q_shape), _shape_str(s.kv_shape),
                         "yes" if s.causal else "no", s.decision, s.reason + (" [key padding]" if s.key_padding else "")))
        widths = [min(max(len(r[c]) for r in rows), 60 if c == 2 else 200) for c in range(len(head))]
        lines = []
        title = f"muse_compile report: {len(self.rewritten)} rewritten, {len(self.kept)} kept, {len(self.graphs)} graph(s)"
        if self.policy is not None:
            title += f"\npolicy: {self.policy}"
        lines.append(title)
        for j, r in enumerate(rows):
            cells = [(r[c] if len(r[c]) <= widths[c] else r[c][: widths[c] - 1] + "…").ljust(widths[c])
                     for c in range(len(head))]
            lines.append("  ".join(cells).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:  # keep notebooks readable
        return f"Report({len(self.rewritten)} rewritten, {len(self.kept)} kept, {len(self.graphs)} graph(s))"


def _shape_str(s) -> str:
    if s is None:
        return "-"
    return "[" + ",".join(str(x) for x in s) + "]"


def inspect(model, *args, **kwargs) -> Report:
    """Run ``model`` (optimized by :func:`muse_compile.optimize`, or plain) once on the example inputs and
    report which attention sites were rewritten under the policy in force, and why.

    Each call traces the model afresh with Dynamo under the policy in force (or the one pinned by
    ``optimize``) and runs the rewritten graph eagerly (no code generation), so the report shows exactly the
    graphs of this call and the optimized model's compiled cache is left untouched.
    """
    from .compiler import MuseBackend, MuseModule, _fresh_entry_fn
    from .policy import current_policy

    import torch
    from . import _compat

    if isinstance(model, MuseModule):
        pol, inner_model, kw = model.active_policy(), model._orig_mod, dict(model._compile_kwargs)
    else:
        pol, inner_model, kw = current_policy(), model, {}
    backend = MuseBackend(pol, "eager")  # a fresh trace, so the report shows exactly this call's graphs
    fn = torch.compile(_fresh_entry_fn(), backend=backend, **kw)
    with _compat.fastpath_disabled():
        fn(inner_model, *args, **kwargs)
    rep = Report(policy=pol)
    for rec in backend.records:
        gi = len(rep.graphs)
        rep.graphs.append(GraphPair(rec.before, rec.after))
        for s in rec.sites:
            rep.sites.append(dataclasses.replace(s, graph=gi))
    return rep
