"""Exceptions raised by rocmux.

Every error names the problem and what to do about it. The tree::

    RocmuxError
    ├── ConfigError              a setting is wrong (names the key and where it came from)
    ├── PluginError              a plugin failed to import or a hook raised
    ├── BackendError
    │   ├── BackendUnavailable   the chosen backend cannot run here (carries its reason)
    │   └── BackendNotFound      no backend of that name is registered
    ├── ModelError
    │   ├── ModelNotFound        the model path does not exist
    │   └── InvalidModel         the file is not a readable GGUF
    └── RuntimeFailure           something went wrong in a runtime
        ├── LaunchError          the server could not be started
        │   ├── BinaryNotFound   the server executable is missing
        │   ├── InvalidFlag      an extra runtime flag is unknown to the binary
        │   └── StartupFailed    the server exited or timed out before it was ready
        ├── ServerCrashed        the server died while running (exit code, stderr tail)
        ├── RequestError         the server answered a request with an error status
        ├── StreamError          the event stream was malformed or ended early
        └── ModelClosed          the model was closed; load it again
"""

from __future__ import annotations


class RocmuxError(Exception):
    """Base class of every rocmux error."""


class ConfigError(RocmuxError):
    """A configuration value is missing or wrong."""


class PluginError(RocmuxError):
    """A plugin could not be loaded, or one of its hooks raised."""


class BackendError(RocmuxError):
    """A backend cannot be used."""


class BackendUnavailable(BackendError):
    """The backend was detected as unavailable; the message carries its reason."""


class BackendNotFound(BackendError):
    """No backend of that name is registered."""


class ModelError(RocmuxError):
    """A model file cannot be used."""


class ModelNotFound(ModelError):
    """The model path does not exist."""


class InvalidModel(ModelError):
    """The file exists but is not a GGUF the runtimes can read."""


class RuntimeFailure(RocmuxError):
    """A runtime failed; subclasses say how."""


class LaunchError(RuntimeFailure):
    """A runtime server could not be started."""


class BinaryNotFound(LaunchError):
    """The runtime's executable could not be found."""


class InvalidFlag(LaunchError):
    """An extra flag is not accepted by the runtime binary."""


class StartupFailed(LaunchError):
    """The server exited, or missed its deadline, before it became ready."""


class ServerCrashed(RuntimeFailure):
    """The server process died after it was ready."""

    def __init__(self, message: str, *, returncode: int | None, stderr_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class RequestError(RuntimeFailure):
    """The server answered a request with an HTTP error status."""

    def __init__(self, message: str, *, status_code: int, body: object = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


class StreamError(RuntimeFailure):
    """The server's event stream was malformed or ended before a finish reason."""


class ModelClosed(RuntimeFailure):
    """The model was closed; load it again to use it."""
