"""Error types of the library; the services map each to one gRPC status."""

from __future__ import annotations


class TokenFlowError(Exception):
    """Base of every error the library raises on purpose."""


class SpecError(TokenFlowError, ValueError):
    """A spec or argument is invalid (maps to INVALID_ARGUMENT).

    `field` names the offending field as a path (e.g. "edit.guidance_scale") so that callers get a
    machine-readable field violation, not only a sentence.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class VideoError(TokenFlowError, ValueError):
    """The input is not a readable video, or has no usable frames (INVALID_ARGUMENT)."""


class TooLargeError(TokenFlowError):
    """The input exceeds a configured size limit (RESOURCE_EXHAUSTED, not retryable).

    `limit_name` and `limit` say which limit and its value, for machine-readable error details;
    `field`, when a request field is over the limit, names it (e.g. "edit.prompt").
    """

    def __init__(
        self,
        message: str,
        *,
        limit_name: str | None = None,
        limit: int | float | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.limit_name = limit_name
        self.limit = limit
        self.field = field


class ModelError(TokenFlowError):
    """The model is missing, incomplete or produced invalid numbers (FAILED_PRECONDITION)."""


class Cancelled(TokenFlowError):
    """The caller asked the job to stop."""
