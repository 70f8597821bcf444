"""rocmux in-process backend on PyTorch."""
