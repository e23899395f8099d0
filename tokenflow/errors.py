"""Error types of the library; the services map each to one gRPC status."""

from __future__ import annotations


class TokenFlowError(Exception):
    """Base of every error the library raises on purpose."""


class SpecError(TokenFlowError, ValueError):
    """A spec or argument is invalid (maps to INVALID_ARGUMENT)."""


class VideoError(TokenFlowError, ValueError):
    """The input is not a readable video, or has no usable frames (INVALID_ARGUMENT)."""


class TooLargeError(TokenFlowError):
    """The input exceeds a configured size limit (RESOURCE_EXHAUSTED)."""


class ModelError(TokenFlowError):
    """The model is missing, incomplete or produced invalid numbers (FAILED_PRECONDITION)."""


class Cancelled(TokenFlowError):
    """The caller asked the job to stop."""
