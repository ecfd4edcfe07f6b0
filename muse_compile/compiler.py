"""``optimize``, the ``"muse"`` Dynamo backend, and the cacheable Inductor pass object.

How the policy in force at *call* time governs: :class:`MuseModule` keeps a small LRU of compiled entries,
one per policy (``max_policies``, default 8). Each entry is ``torch.compile`` of its own fresh entry
function (a distinct code object), so Dynamo's cache for one policy never counts against another's
recompile limit, and an evicted policy's compiled code is freed with its entry. Switching back to a
cached policy costs no compile; a new policy compiles once.

Inside an entry, :class:`MuseBackend` rewrites the Dynamo graph under that entry's policy and hands it to
the inner compiler (Inductor by default; ``backend="aot_eager"`` or ``"eager"`` for quick runs).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
import time
import types
from typing import Any, Callable, List, Optional, Union

import torch
import torch.nn as nn

from . import _compat
from .policy import Policy, current_policy
from .report import Site
from .rewrite import rewrite_graph

__all__ = ["optimize", "MuseModule", "MuseBackend", "MusePass", "muse_backend", "GraphRecord"]

log = logging.getLogger("muse_compile")

_INNER = {
    "inductor": _compat.compile_fx,
    "aot_eager": _compat.aot_eager,
    "eager": lambda gm, example_inputs: gm.forward,
}


@dataclasses.dataclass
class GraphRecord:
    sites: List[Site]
    before: str
    after: str


def _readable(gm: torch.fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    except TypeError:  # pragma: no cover - older signature
        return gm.print_readable(print_output=False)


class MuseBackend:
    """A Dynamo backend: rewrite attention under ``policy``, then compile with ``inner``.

    ``mode`` / ``options`` are ``torch.compile``'s (e.g. ``mode="reduce-overhead"`` for CUDA graphs); they
    configure Inductor, so they need ``inner="inductor"``. ``torch.compile(m, backend=MuseBackend(p), mode=...)``
    hands them to the call instead, with the same effect."""

    def __init__(self, policy: Policy, inner: Union[str, Callable] = "inductor", *, mode: Optional[str] = None,
                 options: Optional[dict] = None, dynamic: Optional[bool] = None):
        self.policy = policy
        self.inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", "callable")
        if isinstance(inner, str):
            if inner not in _INNER:
                raise ValueError(f"inner backend must be one of {sorted(_INNER)} or a callable, got {inner!r}")
            inner = _INNER[inner]
        self.inner = inner
        self.config = self._config(mode, options, dynamic)
        self.records: List[GraphRecord] = []
        self.pass_seconds = 0.0   # time spent in matching + rewriting + recording (not the inner compiler)

    def _config(self, mode, options, dynamic) -> dict:
        if (mode not in (None, "default") or options) and self.inner is not _INNER["inductor"]:
            raise ValueError(f"mode={mode!r} / options configure Inductor; the inner backend here is "
                             f"{self.inner_name!r}")
        return _compat.inductor_config(mode, options, dynamic)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                 options: Optional[dict] = None):
        config = dict(self.config)
        if mode is not None or options:
            config.update(self._config(mode, options, None))
        t0 = time.perf_counter()
        before = _readable(gm)
        sites = rewrite_graph(gm, self.policy)
        after = _readable(gm)
        self.records.append(GraphRecord(sites, before, after))
        self.pass_seconds += time.perf_counter() - t0
        _compat.trace_artifact("muse_rewrite", lambda: after)
        if self.inner is _INNER["inductor"]:
            return _compat.compile_fx(gm, example_inputs, config_patches=config or None)
        return self.inner(gm, example_inputs)


def muse_backend(gm: torch.fx.GraphModule, example_inputs):
    """``torch.compile(m, backend="muse")``: the pass under the policy in force when the graph compiles,
    then Inductor. (``mc.optimize`` adds call-time policy switching and the MHA fast-path handling.)"""
    return MuseBackend(current_policy())(gm, example_inputs)


_compat.register_backend(muse_backend, "muse")


def _source_files() -> List[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(glob.glob(os.path.join(here, "*.py")))


class MusePass(_compat.CustomGraphPass):
    """The rewrite as an Inductor custom graph pass, e.g.
    ``torch.compile(m, options={"pre_grad_custom_pass": MusePass(policy)})``.

    ``uuid()`` hashes the pass's source files and the policy, so Inductor's FX graph cache never serves a
    graph compiled under another policy or another version of the pass.
    """

    def __init__(self, policy: Optional[Policy] = None):
        self.policy = policy if policy is not None else current_policy()
        self.records: List[GraphRecord] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None:
            log.warning("muse_compile: MusePass got a graph without an owning module; skipped")
            return
        before = _readable(gm)
        sites = rewrite_graph(gm, self.policy)
        self.records.append(GraphRecord(sites, before, _readable(gm)))

    def uuid(self) -> Any:
        h = _compat.hash_files(_source_files())
        if isinstance(h, bytes):
            h = h.hex()
        return f"muse:{h}:{self.policy!r}"


# ------------------------------------------------------------------------------------ optimize


def _entry_template(__muse_model, *args, **kwargs):
    return __muse_model(*args, **kwargs)


_counter = [0]


def _fresh_entry_fn() -> Callable:
    """A new function object with its own code object (Dynamo caches per code object)."""
    _counter[0] += 1
    name = f"_muse_entry_{_counter[0]}"
    code = _entry_template.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, _entry_template.__globals__, name)


class _Entry:
    def __init__(self, policy: Policy, inner, compile_kwargs):
        self.policy = policy
        kw = dict(compile_kwargs)
        # mode / options configure Inductor, which runs inside our backend: they go to the backend
        self.backend = MuseBackend(policy, inner, mode=kw.pop("mode", None), options=kw.pop("options", None),
                                   dynamic=kw.get("dynamic"))
        self.fn = torch.compile(_fresh_entry_fn(), backend=self.backend, **kw)


class _FnModule(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class MuseModule(nn.Module):
    """The module :func:`optimize` returns: same call signature and state dict as the original."""

    def __init__(self, model: nn.Module, policy: Optional[Policy], compile_kwargs: dict, max_policies: int = 8):
        super().__init__()
        self._orig_mod = model
        object.__setattr__(self, "_pinned", policy)
        kw = dict(compile_kwargs)
        inner = kw.pop("backend", "inductor")
        if (kw.get("mode") not in (None, "default") or kw.get("options")) and inner != "inductor":
            raise ValueError(f"mode={kw.get('mode')!r} / options configure Inductor; they need "
                             f"backend='inductor', not {inner!r}")
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_compile_kwargs", kw)
        object.__setattr__(self, "_entries", collections.OrderedDict())
        object.__setattr__(self, "_max_policies", max_policies)

    # -- policy handling
    def active_policy(self) -> Policy:
        return self._pinned if self._pinned is not None else current_policy()

    def _entry(self, pol: Policy) -> _Entry:
        e = self._entries.get(pol)
        if e is None:
            e = _Entry(pol, self._inner, self._compile_kwargs)
            self._entries[pol] = e
            while len(self._entries) > self._max_policies:
                old, _ = self._entries.popitem(last=False)
                log.info("muse_compile: evicted compiled graphs of policy %r", old)
        else:
            self._entries.move_to_end(pol)
        return e

    @property
    def compiled_policies(self) -> List[Policy]:
        return list(self._entries)

    def forward(self, *args, **kwargs):
        e = self._entry(self.active_policy())
        with _compat.fastpath_disabled():
            return e.fn(self._orig_mod, *args, **kwargs)

    # -- the original module's identity
    def state_dict(self, *args, **kwargs):
        return self._orig_mod.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self._orig_mod.load_state_dict(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_orig_mod"), name)

    def extra_repr(self) -> str:
        return f"policy={'call-time' if self._pinned is None else self._pinned}, inner={self._inner!r}"


def optimize(model: Union[nn.Module, Callable], policy: Optional[Policy] = None, **compile_kwargs) -> MuseModule:
    """Compile ``model`` with the MuSe pass.

    Args:
        model: an ``nn.Module`` (or a plain function of tensors).
        policy: pin a :class:`Policy` for this model; ``None`` uses the policy in force at each call
            (``with muse_compile.policy(...)``), compiling once per distinct policy (LRU of 8).
        **compile_kwargs: passed to ``torch.compile`` (``dynamic``, ``mode``, ``fullgraph``, ``options``...).
            ``backend`` names the compiler used *after* the rewrite: ``"inductor"`` (default),
            ``"aot_eager"`` or ``"eager"`` (or a Dynamo backend callable).

    Returns:
        A :class:`MuseModule` with the same call signature and the same state dict. While it runs, the
        fused ``nn.MultiheadAttention`` / ``TransformerEncoderLayer`` fast path is off (restored after), so
        their attention is visible to the pass.
    """
    if policy is not None and not isinstance(policy, Policy):
        raise ValueError(f"policy must be a muse_compile.Policy or None, got {type(policy).__name__}")
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise ValueError(f"optimize() needs an nn.Module or a callable, got {type(model).__name__}")
        model = _FnModule(model)
    return MuseModule(model, policy, compile_kwargs)
