"""Entry point of the ``llamacpp_hip`` plugin: hook implementations only, no I/O."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rocmux import hookimpl

if TYPE_CHECKING:
    from rocmux.registry import BackendRegistry
    from rocmux.setup import SetupRequest

NAME = "llamacpp_hip"


@hookimpl
def rocmux_register_backends(registry: BackendRegistry) -> None:
    from rocmux_llamacpp_hip.backend import LlamaCppBackend

    registry.add(LlamaCppBackend(plugins=registry.manager))


@hookimpl
def rocmux_setup_backend(request: SetupRequest) -> bool | None:
    if request.backend not in (NAME, "llamacpp", "llama.cpp"):
        return None
    from rocmux_llamacpp_hip.install import install_llama_server

    install_llama_server(request)
    return True
