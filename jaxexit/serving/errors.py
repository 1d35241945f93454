"""The error a request gets: `RequestError`, a ValueError with the HTTP status to answer with."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the service refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status
