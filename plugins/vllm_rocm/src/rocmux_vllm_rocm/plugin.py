"""Entry point of the ``vllm_rocm`` plugin: hook implementations only, no I/O.

The backend module is imported inside the hook so that loading the plugin stays cheap;
nothing in this package imports vLLM or PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rocmux import hookimpl

if TYPE_CHECKING:
    from rocmux.registry import BackendRegistry


@hookimpl
def rocmux_register_backends(registry: BackendRegistry) -> None:
    from rocmux_vllm_rocm.backend import VllmBackend

    registry.add(VllmBackend(plugins=registry.manager))
