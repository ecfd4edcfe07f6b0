"""MuSe kernels: the PyTorch reference and the Triton kernels (installed as ``muse_compile.kernels``)."""
