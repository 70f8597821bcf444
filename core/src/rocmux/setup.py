"""What ``rocmux setup NAME`` hands to the plugin that provides a runtime."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import attrs

Variant = Literal["cpu", "hip", "cuda", "vulkan"]


def _no_progress(message: str) -> None:
    return None


@attrs.frozen(kw_only=True)
class SetupRequest:
    """A request to install or build a backend's runtime."""

    backend: str
    variant: Variant = "cpu"
    progress: Callable[[str], None] = _no_progress
    dry_run: bool = False
