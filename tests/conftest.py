"""Shared pytest setup. Without CUDA, Triton kernels run in the interpreter; TRITON_INTERPRET must be set
before any Triton kernel module is imported, so it is set here, at collection start."""
import os

try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def muse_levels_at_tiny_sizes(monkeypatch):
    """Causal levels run MuSe from S = 4·C on (the default needs S >= 64·C, beyond the interpreter's tiny
    shapes), so causal cases exercise the level kernels; kernels and reference share the schedule."""
    from muse_compile.lowering import plan as PL, schedule
    monkeypatch.setattr(schedule, "EXACT_LEVEL_FACTOR", 4)
    PL._plan.cache_clear()
    yield
    PL._plan.cache_clear()
