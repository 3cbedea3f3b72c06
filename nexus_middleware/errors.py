"""The suite's exception hierarchy: every error nexus raises derives from `NexusError`."""

__all__ = [
    "ConfigurationError",
    "InvalidPathError",
    "NexusError",
    "StorageError",
    "StorageUnavailableError",
    "UnknownAPIKeyError",
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


class UnknownAPIKeyError(NexusError, LookupError):
    """The API key management API was asked about a key id the store does not hold."""
