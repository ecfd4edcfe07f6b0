"""muse_compile: replace long-context softmax attention with Multipole Semantic Attention (MuSe).

Public API (see README and docs/usage.md): ``optimize``, ``Policy``, ``policy``, ``current_policy``,
``inspect``, ``multipole_attention``, ``relative_squared_error``.
"""
import os as _os

# In a source checkout that is not installed, lowering/ and kernels/ sit beside this package; the
# installed distribution maps them to muse_compile.lowering / muse_compile.kernels (pyproject).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "reference.py")):
    __path__.append(_root)  # type: ignore[name-defined]

from .policy import Policy, current_policy, policy  # noqa: E402
from .functional import multipole_attention  # noqa: E402
from .metrics import relative_squared_error, attention_error  # noqa: E402
from .report import Report, Site, inspect  # noqa: E402
from .compiler import optimize, MusePass  # noqa: E402

__all__ = [
    "Policy", "policy", "current_policy", "multipole_attention", "relative_squared_error",
    "attention_error", "optimize", "inspect", "Report", "Site", "MusePass",
]
__version__ = "0.1.0"
