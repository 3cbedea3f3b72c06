"""The suite's exception hierarchy: every error nexus raises derives from `NexusError`."""

__all__ = [
    "ConfigurationError",
    "DeadlineExceededError",
    "InvalidPathError",
    "NexusError",
    "StorageError",
    "StorageUnavailableError",
]


class NexusError(Exception):
    """Base class of every exception raised by nexus-middleware."""


class ConfigurationError(NexusError, ValueError):
    """An option is invalid; raised at construction, never per request."""


class InvalidPathError(NexusError, ValueError):
    """A request path cannot be normalized safely (a NUL byte, or a separator the policy rejects)."""


class StorageError(NexusError):
    """A storage backend failed."""


class StorageUnavailableError(StorageError):
    """A storage backend cannot be reached (connection refused, timeout, breaker open)."""


class DeadlineExceededError(NexusError, TimeoutError):
    """A deadline passed after the response started; raised so that the server drops the connection."""
