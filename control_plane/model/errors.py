"""Domain errors: what went wrong, with the HTTP status it means; ``web/middleware.py`` turns
them into JSON answers, in one place.

    DomainError
     ├── BadRequest        400
     │    └── TooLarge     400 (the request is over the size cap)
     ├── Unauthorized      401
     ├── Forbidden         403 (tier limits)
     ├── NotFound          404 (also for other accounts' objects: never 403)
     ├── Conflict          409
     ├── PayloadTooLarge   413 (an agent's upload past its limits, refused before its body)
     ├── Unprocessable     422 (an idempotency key reused with another body)
     ├── TooManyRequests   429 (a submit rate limit; ``retry_after_s`` goes in Retry-After)
     ├── Unavailable       503 (a store the control plane relies on cannot be reached)
     └── GatewayTimeout    504 (a runner did not answer in time)

Nothing below the API layer raises ``web.HTTP*``.
"""

from __future__ import annotations


class DomainError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(DomainError):
    status = 400


class TooLarge(BadRequest):
    pass


class Unauthorized(DomainError):
    status = 401


class Forbidden(DomainError):
    status = 403


class NotFound(DomainError):
    status = 404


class Conflict(DomainError):
    status = 409


class PayloadTooLarge(DomainError):
    status = 413


class Unprocessable(DomainError):
    status = 422


class TooManyRequests(DomainError):
    status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(DomainError):
    status = 503


class GatewayTimeout(DomainError):
    status = 504
