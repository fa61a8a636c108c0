"""Key checks: the API key on /v1 and the tokenizer routes, the admin key on /admin/."""
from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request

from .errors import APIError


def bearer_key_check(key: str | None, what: str = "API key",
                     x_api_key: bool = False) -> Callable[[Request], Awaitable[None]]:
    """A dependency that lets a request through only with `Authorization: Bearer <key>` (all if key is None);
    with x_api_key, also with `x-api-key: <key>`, the header Anthropic's clients send."""
    async def check(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
        if given is None and x_api_key:
            given = request.headers.get("x-api-key")
        # compare_digest takes the same time wherever the strings differ: no timing oracle.
        if given is None or not secrets.compare_digest(given.encode(), key.encode()):
            how = "`Authorization: Bearer <key>`" + (" or `x-api-key: <key>`" if x_api_key else "")
            raise APIError(401, f"Incorrect or missing {what}: send {how}", code="invalid_api_key")
    return check
