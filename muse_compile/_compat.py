"""Every use of private ``torch._dynamo`` / ``torch._inductor`` / symbolic-shape APIs, feature-tested.

The rest of muse_compile imports from here only, so a moved or renamed private API is fixed in one
place. Checked on torch 2.13 (CPU) and written against torch 2.11 sources (GPU machines); every helper
tests for what it needs (``hasattr``, ``inspect.signature``) rather than comparing version strings.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect as _inspect
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = [
    "compile_fx", "inductor_config", "register_backend", "aot_eager", "CustomGraphPass", "hash_files", "size_hint",
    "is_symbolic", "placeholder_example", "placeholder_is_param_or_buffer", "fastpath_disabled",
]


# ----------------------------------------------------------------------------------- backends


def inductor_config(mode: Optional[str] = None, options: Optional[dict] = None, dynamic=None) -> dict:
    """Inductor config patches of ``torch.compile``'s ``mode`` and ``options`` (what torch's own Inductor
    wrapper applies; e.g. ``mode="reduce-overhead"`` turns on CUDA graphs)."""
    from torch._inductor import list_mode_options
    cfg = dict(list_mode_options(mode, dynamic)) if mode not in (None, "default") else {}
    cfg.update(options or {})
    return cfg


def compile_fx(gm: torch.fx.GraphModule, example_inputs, config_patches: Optional[dict] = None) -> Callable:
    """Hand a (rewritten) Dynamo graph to Inductor, with optional config patches (``inductor_config``)."""
    from torch._inductor.compile_fx import compile_fx as _cfx
    if config_patches:
        return _cfx(gm, example_inputs, config_patches=config_patches)
    return _cfx(gm, example_inputs)


def aot_eager(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """AOTAutograd without Inductor codegen (fast to compile; used by tests and ``backend="aot_eager"``)."""
    from torch._dynamo.backends.debugging import aot_eager as _aot_eager
    return _aot_eager(gm, example_inputs)


def register_backend(fn: Callable, name: str) -> None:
    """Register ``fn`` as the Dynamo backend ``name`` (idempotent: a re-import does not raise)."""
    from torch._dynamo.backends import registry
    lookup = getattr(registry, "_COMPILER_FNS", None)
    if isinstance(lookup, dict) and name in lookup:
        lookup[name] = fn
        return
    try:
        torch._dynamo.register_backend(compiler_fn=fn, name=name)
    except Exception:  # pragma: no cover - older/newer registries that refuse duplicates
        if isinstance(lookup, dict):
            lookup[name] = fn


# --------------------------------------------------------------------------------- custom passes

try:  # torch >= 2.6
    from torch._inductor.custom_graph_pass import CustomGraphPass  # type: ignore
except Exception:  # pragma: no cover
    class CustomGraphPass:  # type: ignore[no-redef]
        """Stand-in with the same two methods when Inductor has no cacheable pass base class."""

        def __call__(self, graph):  # noqa: D401
            raise NotImplementedError

        def uuid(self):
            return None


def hash_files(paths: Iterable[str]) -> bytes:
    """A digest of the given source files (Inductor's helper when present, else sha256)."""
    paths = tuple(sorted(paths))
    try:
        from torch._inductor.custom_graph_pass import get_hash_for_files
        return get_hash_for_files(paths)
    except Exception:  # pragma: no cover
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                h.update(f.read())
        return h.digest()


# ------------------------------------------------------------------------------- symbolic shapes


def is_symbolic(x: Any) -> bool:
    """True for a SymInt/SymFloat/SymBool whose value is not a known constant."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        node = x.node
        is_const = getattr(node, "is_constant", None)
        if callable(is_const):
            try:
                return not is_const()
            except Exception:
                return True
        return True
    return False


def size_hint(x: Any) -> Any:
    """The concrete example value behind a (possibly symbolic) int/float."""
    if not isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x
    node = x.node
    for name in ("optimization_hint", "hint_int", "size_hint"):
        fn = getattr(torch.fx.experimental.symbolic_shapes, name, None)
        if fn is not None:
            try:
                v = fn(x)
                if v is not None:
                    return type(_py_type(x))(v)
            except Exception:
                pass
    hint = getattr(node, "hint", None)
    if hint is not None:
        return type(_py_type(x))(hint)
    env = getattr(node, "shape_env", None)
    if env is not None:
        return type(_py_type(x))(env.size_hint(node.expr))
    raise RuntimeError(f"no hint for symbolic value {x}")


def _py_type(x):
    if isinstance(x, torch.SymInt):
        return 0
    if isinstance(x, torch.SymFloat):
        return 0.0
    return False


def statically_true(expr: Any) -> bool:
    """``expr`` (bool or SymBool) is true for every value of its symbols (no guard added)."""
    if isinstance(expr, bool):
        return expr
    fn = getattr(torch.fx.experimental.symbolic_shapes, "statically_known_true", None)
    if fn is not None:
        return bool(fn(expr))
    return False  # pragma: no cover


# ------------------------------------------------------------------------------ Dynamo graph meta


def node_example(node: torch.fx.Node) -> Any:
    """The fake value Dynamo recorded for a node (``example_value``; aten graphs use ``val``)."""
    meta = node.meta
    if "example_value" in meta:
        return meta["example_value"]
    return meta.get("val")


def placeholder_example(node: torch.fx.Node) -> Any:
    """The real example value of a Dynamo placeholder (a tensor, parameter, buffer, or int), or None."""
    ga = node.meta.get("grapharg")
    if ga is None:
        return None
    for attr in ("example", "_example"):
        try:
            val = getattr(ga, attr)
        except Exception:
            continue
        if callable(val) and not isinstance(val, torch.Tensor):  # a weak reference
            try:
                val = val()
            except Exception:
                val = None
        if val is not None:
            return val
    return None


def placeholder_source(node: torch.fx.Node) -> str:
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    if src is None:
        return ""
    try:
        return src.name() if callable(getattr(src, "name", None)) else str(src)
    except Exception:
        return str(src)


def placeholder_is_param_or_buffer(node: torch.fx.Node) -> bool:
    """A placeholder that Dynamo lifted from a module's parameters or buffers."""
    ex = placeholder_example(node)
    if isinstance(ex, torch.nn.Parameter):
        return True
    ga = node.meta.get("grapharg")
    src = repr(getattr(ga, "source", "")) + placeholder_source(node)
    return any(s in src for s in ("_buffers", "_parameters", "ParamBufferSource"))


# ------------------------------------------------------------------------------- nn fast paths


@contextlib.contextmanager
def fastpath_disabled():
    """Turn the fused MHA / TransformerEncoderLayer fast path off for the block; restore it after."""
    mha = getattr(torch.backends, "mha", None)
    get = getattr(mha, "get_fastpath_enabled", None)
    set_ = getattr(mha, "set_fastpath_enabled", None)
    if get is None or set_ is None:  # pragma: no cover
        yield
        return
    prev = get()
    set_(False)
    try:
        yield
    finally:
        set_(prev)


def signature_has(fn: Callable, name: str) -> bool:
    try:
        return name in _inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def trace_artifact(name: str, payload: Callable[[], str]) -> None:
    """Emit a string artifact into ``TORCH_TRACE`` (tlparse) when the structured-trace API exists."""
    fn = getattr(getattr(torch, "_logging", None), "trace_structured", None)
    if fn is None:
        return
    try:
        fn("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload)
    except Exception:
        pass


def optional_import(modname: str) -> Optional[Any]:
    import importlib
    try:
        return importlib.import_module(modname)
    except ImportError:
        return None


@contextlib.contextmanager
def autograd_inside_op():
    """Re-enable autograd dispatch (and grad mode) inside a ``custom_op`` implementation.

    A custom op's kernel runs with the Autograd dispatch keys excluded, so ops inside it build no graph
    even under ``torch.enable_grad()``. The backward op recomputes the forward and differentiates it,
    so it lifts that exclusion for the block.
    """
    C = torch._C
    guard = getattr(C, "_ForceDispatchKeyGuard", None)
    if guard is None or not hasattr(C, "_dispatch_tls_local_exclude_set"):  # pragma: no cover
        with torch.enable_grad():
            yield
        return
    K = C.DispatchKey
    inc = C._dispatch_tls_local_include_set()
    exc = C._dispatch_tls_local_exclude_set()
    for name in ("AutogradOther", "AutogradNestedTensor", "AutogradCPU", "AutogradCUDA",
                 "AutogradFunctionality"):
        key = getattr(K, name, None)
        if key is not None:
            try:
                exc = exc.remove(key)
            except Exception:
                pass
    with guard(inc, exc), torch.enable_grad():
        yield
