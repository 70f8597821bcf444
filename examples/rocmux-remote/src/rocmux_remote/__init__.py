"""rocmux backend ``remote``: an OpenAI-compatible server on another host as a runtime."""
