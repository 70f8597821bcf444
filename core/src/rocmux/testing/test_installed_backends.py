"""The conformance suite for installed backends named on the command line::

pytest --rocmux-backend llamacpp_hip [--rocmux-model PATH] --pyargs rocmux.testing
"""

from __future__ import annotations

from rocmux.testing.conformance import BackendConformance


class TestInstalledBackend(BackendConformance):
    """Runs once per ``--rocmux-backend NAME``; without one, every check is not run."""
