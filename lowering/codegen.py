"""Generation of specialised Triton source for a kernel spec, and loading it (cached by spec).

The kernels are rendered from ``muse_compile.kernels.triton_templates.TEMPLATE``: head dim, value dim, their
paddings, dot precision and the dipole switch become literals of the generated module. Each distinct spec is
rendered once per process, written to a cache folder (Triton's JIT reads kernel source from a file) and
imported; ``source(spec)`` returns the text.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import string
import sys
import tempfile
import threading
from typing import Dict

__all__ = ["KernelSpec", "render", "load", "source", "cache_dir"]

_LOCK = threading.Lock()
_MODULES: Dict["KernelSpec", object] = {}


def _pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What the generated source depends on (everything else is a runtime argument or a block size)."""
    head_dim: int
    value_dim: int
    precision: str        # "ieee" | "tf32" | "tf32x3": tl.dot input precision of float32 operands
    dipole: bool
    dot_dtype: str = "float32"   # "bfloat16" | "float16": 16-bit dot operands (native tensor-core path)

    @property
    def native(self) -> bool:
        return self.dot_dtype != "float32"

    @property
    def bd(self) -> int:
        return _pow2(self.head_dim)

    @property
    def bdv(self) -> int:
        return _pow2(self.value_dim)

    def key(self) -> str:
        return (f"d{self.head_dim}_dv{self.value_dim}_{self.precision}_{self.dot_dtype}_"
                f"{'dip' if self.dipole else 'mono'}")


def render(spec: KernelSpec) -> str:
    """The generated Triton module source for ``spec``."""
    from muse_compile.kernels.reference import DIPOLE_TRUST
    from muse_compile.kernels.triton_templates import TEMPLATE

    d = spec.head_dim
    if d == 1:
        u0 = "tl.where(dmask, 1.0, 0.0)"
    else:
        u0 = f"tl.where(dmask, 1.0 + offs_d.to(tl.float32) / {d - 1}.0, 0.0)"
    return string.Template(TEMPLATE).substitute(
        SPEC=spec.key(), D=d, DV=spec.value_dim, BD=spec.bd, BDV=spec.bdv, PREC=spec.precision,
        PREC32="ieee" if spec.precision == "ieee" else "tf32x3",
        DIPOLE="True" if spec.dipole else "False", U0=u0, NATIVE="True" if spec.native else "False",
        CDT=f"tl.{spec.dot_dtype}", TRUST=repr(float(DIPOLE_TRUST)))


def cache_dir() -> str:
    path = os.environ.get("MUSE_COMPILE_CACHE") or os.path.join(
        tempfile.gettempdir(), f"muse_compile_kernels_{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(path, exist_ok=True)
    return path


def source(spec: KernelSpec) -> str:
    return render(spec)


def load(spec: KernelSpec):
    """Import (once per process) the generated module of ``spec``."""
    mod = _MODULES.get(spec)
    if mod is not None:
        return mod
    with _LOCK:
        mod = _MODULES.get(spec)
        if mod is not None:
            return mod
        text = render(spec)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        name = f"muse_gen_{spec.key()}_{digest}"
        path = os.path.join(cache_dir(), name + ".py")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        ispec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(ispec)
        sys.modules[name] = mod
        ispec.loader.exec_module(mod)
        _MODULES[spec] = mod
        return mod
