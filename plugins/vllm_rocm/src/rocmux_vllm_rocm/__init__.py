"""rocmux backend for vLLM (``vllm serve``) on ROCm; see ``backend.VllmBackend``."""
