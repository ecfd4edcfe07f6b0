"""The one policy object: when and how attention sites are replaced by MuSe.

A :class:`Policy` is immutable and validated on construction. The policy *in force* is thread-local:
``with muse_compile.policy(min_context=8192):`` sets it for calls made inside the block on the current
thread, nests, and restores the previous one on exit (also when the block raises).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Iterator, Optional

__all__ = ["Policy", "policy", "current_policy"]


@dataclasses.dataclass(frozen=True)
class Policy:
    """When attention is rewritten to MuSe, and with which parameters.

    Args:
        min_context: a site is rewritten only when its key length is at least this.
        clusters: key clusters per (batch, head); also query clusters unless ``query_clusters`` is set.
        query_clusters: a separate query cluster count, or ``None`` to use ``clusters``.
        causal: rewrite causal sites with the hierarchical causal scheme; ``False`` keeps them exact.
        dipole: add the guarded dipole correction to the monopole summaries.
        kmeans_iters: Lloyd iterations per clustering (0 = assign to the initial centroids).
        block_size: size of the exact local blocks of causal attention.
        enabled: master switch; ``False`` keeps every site exact.

    Example::

        >>> p = Policy(min_context=8192, clusters=64)
        >>> p.replace(dipole=False).dipole
        False
    """

    min_context: int = 4096
    clusters: int = 128
    query_clusters: Optional[int] = None
    causal: bool = True
    dipole: bool = True
    kmeans_iters: int = 2
    block_size: int = 256
    enabled: bool = True

    def __post_init__(self) -> None:
        def _int(name: str, lo: int) -> None:
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise ValueError(f"Policy.{name} must be an int, got {type(val).__name__} {val!r}")
            if val < lo:
                raise ValueError(f"Policy.{name} must be >= {lo}, got {val}")

        def _bool(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Policy.{name} must be a bool, got {getattr(self, name)!r}")

        _int("min_context", 0)
        _int("clusters", 1)
        if self.query_clusters is not None:
            _int("query_clusters", 1)
        _int("kmeans_iters", 0)
        _int("block_size", 1)
        for name in ("causal", "dipole", "enabled"):
            _bool(name)

    def replace(self, **changes) -> "Policy":
        """A copy with some fields changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def op_kwargs(self) -> dict:
        """The keyword arguments of :func:`muse_compile.multipole_attention` this policy sets."""
        return dict(
            clusters=self.clusters,
            query_clusters=self.query_clusters,
            dipole=self.dipole,
            kmeans_iters=self.kmeans_iters,
            block_size=self.block_size,
        )


_DEFAULT = Policy()
_local = threading.local()


def current_policy() -> Policy:
    """The policy in force on this thread (the innermost ``policy(...)`` block, else the defaults)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _DEFAULT


class policy(contextlib.ContextDecorator):
    """Context manager and decorator that puts a policy in force on the current thread.

    ``policy(Policy(...))`` uses the given object; ``policy(**fields)`` changes those fields of the policy
    currently in force (so blocks nest: an inner block inherits what it does not set).

    Example::

        >>> with policy(min_context=8192, clusters=64):
        ...     current_policy().clusters
        64
    """

    def __init__(self, base: Optional[Policy] = None, /, **fields) -> None:
        if base is not None and not isinstance(base, Policy):
            raise ValueError(f"policy() takes a Policy or keyword fields, got {type(base).__name__}")
        unknown = set(fields) - {f.name for f in dataclasses.fields(Policy)}
        if unknown:
            raise ValueError(f"unknown policy field(s): {', '.join(sorted(unknown))}")
        self._base = base
        self._fields = fields
        if base is not None:  # validate eagerly so a bad policy fails where it is written
            base.replace(**fields)
        else:
            _DEFAULT.replace(**fields)

    def __enter__(self) -> Policy:
        base = self._base if self._base is not None else current_policy()
        new = base.replace(**self._fields) if self._fields else base
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(new)
        return new

    def __exit__(self, *exc) -> bool:
        _local.stack.pop()
        return False
