"""From a matched attention site and a policy to a kernel plan (installed as ``muse_compile.lowering``)."""
