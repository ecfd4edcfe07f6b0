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
