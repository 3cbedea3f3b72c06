"""The suite's exception hierarchy: every error nexus raises derives from `NexusError`."""

__all__ = [
    "ConfigurationError",
    "DeadlineExceededError",
    "InvalidPathError",
    "InvalidTokenError",
    "NexusError",
    "RequestBodyTooLargeError",
    "StorageError",
    "StorageUnavailableError",
    "UnknownAPIKeyError",
    "VerifierUnavailableError",
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


class UnknownAPIKeyError(NexusError, LookupError):
    """The API key management API was asked about a key id the store does not hold."""


class InvalidTokenError(NexusError):
    """A bearer token was rejected. `reason` is the audit reason (expired, revoked, unknown_key, ...);
    `description` is safe to send to the client (RFC 6750 `error_description`)."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


class VerifierUnavailableError(NexusError):
    """What a token is checked against (a JWKS endpoint, an introspection endpoint, the revocation store)
    cannot be reached and no usable cached answer is left: the request fails closed with 503."""


class DeadlineExceededError(NexusError, TimeoutError):
    """A deadline passed after the response started; raised so that the server drops the connection."""
