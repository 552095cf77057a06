"""The exceptions r1nest raises, and how each becomes an HTTP answer or a CLI message.

    R1nestError                      CLI: "error: <message>", exit 1
    ├── ConfigError                  bad settings / flags (exit 2)
    ├── PlanError                    the planner refuses: reason + alternatives (exit 3)
    ├── StoreError                   ledger / key store failures (a bare one is a bug: 500)
    │   ├── StoreUnavailable         the store cannot answer now: unreachable, locked past its
    │   │                            busy timeout, throttled, closed (HTTP 503 + Retry-After)
    │   ├── InvalidLedgerArgument    the caller's arguments are refused: amounts out of range,
    │   │                            bad expiry, duplicate key id, unknown reservation (400)
    │   ├── InsufficientCredits      -> 406 insufficient_credits
    │   ├── UnknownKey               no such key id (admin API -> 404)
    │   ├── KeyLimitReached          max_concurrency / rate_limit_rpm -> 429 + Retry-After
    │   └── ReservationClosed        settle/void of a reservation already closed
    └── ApiError                     anything answered over HTTP with an OpenAI-style body
        ├── BadRequest 400 · Unauthorized 401 · NotFound 404 · MethodNotAllowed 405
        ├── PaymentRequired 406 · PayloadTooLarge 413 · RateLimited 429
        └── InternalError 500 · UpstreamError 502 · Unavailable 503
"""

from __future__ import annotations

from typing import Any


class R1nestError(Exception):
    exit_code = 1


class ConfigError(R1nestError):
    exit_code = 2


class PlanError(R1nestError):
    exit_code = 3

    def __init__(self, reason: str, alternatives: list[str] | None = None) -> None:
        self.reason = reason
        self.alternatives = list(alternatives or [])
        text = reason
        if self.alternatives:
            text += " What fits: " + "; ".join(self.alternatives) + "."
        super().__init__(text)


class StoreError(R1nestError):
    """Base of the ledger's errors. Raise a subclass: a bare StoreError means a bug."""


class StoreUnavailable(StoreError):
    """The store cannot answer now (unreachable, locked past its busy timeout, throttled, closed);
    the same call may succeed later. HTTP answers it with 503 and Retry-After."""


class InvalidLedgerArgument(StoreError):
    """The store refuses the arguments (an amount out of range, a bad expiry or name, a key id
    that exists, a reservation that does not); retrying the same call fails again. HTTP: 400."""


STORE_RETRY_AFTER_S = 5  # what a 503 for an unavailable store tells the client to wait


class InsufficientCredits(StoreError):
    def __init__(self, remaining_credits: int, needed_credits: int) -> None:
        self.remaining_credits = remaining_credits
        self.needed_credits = needed_credits
        super().__init__(
            f"not enough credits: {remaining_credits} left, {needed_credits} needed"
        )


class UnknownKey(StoreError):
    pass


class KeyLimitReached(StoreError):
    """A reservation would pass the key's `max_concurrency` or `rate_limit_rpm`; nothing changed."""

    def __init__(self, limit: str, retry_after_s: float) -> None:
        super().__init__(f"key limit {limit} reached; retry in {retry_after_s:g} s")
        self.limit = limit  # "max_concurrency" or "rate_limit_rpm"
        self.retry_after_s = retry_after_s


class ReservationClosed(StoreError):
    pass


class ApiError(R1nestError):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        """The same error in the shape of Anthropic's Messages API (its error `type` for the
        status; r1nest's own `code` beside it, e.g. `insufficient_credits` for a 406)."""
        return {
            "type": "error",
            "error": {
                "type": ANTHROPIC_ERROR_TYPES.get(self.status_code, "api_error"),
                "message": self.message,
                "code": self.code,
            },
        }


# Anthropic's error types by HTTP status (its API reference, "Errors"); 406 and 503 are r1nest's.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 406: "billing_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
    529: "overloaded_error",
}


class BadRequest(ApiError):
    status_code, error_type, code = 400, "invalid_request_error", "invalid_request"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"  # OpenAI's code for a prompt (+ max_tokens) over the context


class Unauthorized(ApiError):
    status_code, error_type, code = 401, "invalid_request_error", "invalid_api_key"


class NotFound(ApiError):
    status_code, error_type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(ApiError):
    status_code, error_type, code = 405, "invalid_request_error", "method_not_allowed"


class PaymentRequired(ApiError):
    status_code, error_type, code = 406, "insufficient_quota", "insufficient_credits"


class PayloadTooLarge(ApiError):
    status_code, error_type, code = 413, "invalid_request_error", "request_too_large"


class RateLimited(ApiError):
    status_code, error_type, code = 429, "rate_limit_error", "rate_limited"


class InternalError(ApiError):
    status_code, error_type, code = 500, "server_error", "internal_error"


class UpstreamError(ApiError):
    status_code, error_type, code = 502, "server_error", "engine_error"


class Unavailable(ApiError):
    status_code, error_type, code = 503, "server_error", "engine_unavailable"


def store_unavailable(message: str = "The credit ledger is unavailable; retry shortly.") -> Unavailable:
    """The HTTP answer for a StoreUnavailable: 503, code `ledger_unavailable`, Retry-After. The
    default message names no detail of the store (public callers); the admin API adds it."""
    return Unavailable(
        message, code="ledger_unavailable", headers={"Retry-After": str(STORE_RETRY_AFTER_S)}
    )
