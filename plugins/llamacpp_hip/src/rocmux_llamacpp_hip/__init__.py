"""rocmux backend for llama.cpp's llama-server."""
