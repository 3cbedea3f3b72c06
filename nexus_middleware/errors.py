"""The suite's exception hierarchy: every error nexus raises derives from `NexusError`."""

__all__ = [
    "ConfigurationError",
    "InvalidPathError",
    "NexusError",
    "RequestBodyTooLargeError",
    "StorageError",
    "StorageUnavailableError",
]


class NexusError(Exception):
    """Base class of every exception raised by nexus-middleware."""


class ConfigurationError(NexusError, ValueError):
    """An option is invalid; raised at construction, never per request."""


class InvalidPathError(NexusError, ValueError):
    """A request path cannot be normalized safely (a NUL byte, or a separator the policy rejects)."""


class RequestBodyTooLargeError(NexusError):
    """Raised from `receive()` when a request body grows past its limit; the body limit layer answers 413.

    An app that catches it should return without sending: the 413 is already on its way (or, when the
    response had started, the connection is aborted).
    """


class StorageError(NexusError):
    """A storage backend failed."""


class StorageUnavailableError(StorageError):
    """A storage backend cannot be reached (connection refused, timeout, breaker open)."""
