"""rocmux backend for vLLM (``vllm serve``)."""
