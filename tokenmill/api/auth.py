"""Bearer-key checks: the API key on /v1 and the tokenizer routes, the admin key on /admin/."""
from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request

from .errors import APIError


def bearer_key_check(key: str | None, what: str = "API key") -> Callable[[Request], Awaitable[None]]:
    """A dependency that lets a request through only with `Authorization: Bearer <key>` (all if key is None)."""
    async def check(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the strings differ: no timing oracle.
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, f"Incorrect or missing {what}: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")
    return check
