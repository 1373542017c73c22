"""Domain errors raised by the store and the rules, turned into answers by the app."""

from __future__ import annotations


class VaporaError(Exception):
    """Base of the errors a caller can cause; each maps to one HTTP status."""

    status = 400
    code = "bad_request"

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def as_json(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {"code": self.code, "message": self.message, "field": self.field}
        }


class InvalidInput(VaporaError):
    status = 400
    code = "invalid"


class RuleViolation(VaporaError):
    """The change is well-formed but the workflow's rules forbid it now."""

    status = 409
    code = "conflict"


class NotFound(VaporaError):
    status = 404
    code = "not_found"


class Unauthorized(VaporaError):
    status = 401
    code = "unauthorized"


class Forbidden(VaporaError):
    status = 403
    code = "forbidden"


class RetryLater(VaporaError):
    """An error that goes away by itself; the answer says when to retry."""

    def __init__(self, field: str | None, message: str, retry_after_s: float) -> None:
        super().__init__(field, message)
        self.retry_after_s = retry_after_s


class TooManyRequests(RetryLater):
    status = 429
    code = "too_many_requests"


class Unavailable(RetryLater):
    """The database cannot take the change now, e.g. another process holds it."""

    status = 503
    code = "unavailable"
