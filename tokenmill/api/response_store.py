"""Stored responses (store: true), for GET /v1/responses/{id} and for continuing a conversation with
previous_response_id.

In memory and bounded three ways, so that clients cannot grow the server without end: a number of
entries, their total size (the UTF-8 JSON of the response and of its conversation; the objects held
in memory take a few times that), and an age. The oldest
entries go first.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import TypeAdapter

from .protocol_responses import InputItem, Response

logger = logging.getLogger("tokenmill.api")

_ITEMS = TypeAdapter(list[InputItem])


@dataclass
class StoredResponse:
    """A response and the conversation a continuation renders before its own input: the earlier turns,
    this request's input items and the response's output, as input items (without instructions, which
    do not carry over)."""

    response: Response
    conversation: list
    size: int
    stored_at: float


class ResponseStore:
    """Responses by id, oldest first; an entry expires ttl_s seconds after it was stored."""

    def __init__(self, max_entries: int = 1000, max_bytes: int = 64 << 20, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_entries < 1 or max_bytes < 1 or not ttl_s > 0:
            raise ValueError("the response store needs max_entries >= 1, max_bytes >= 1 and ttl_s > 0")
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self.clock = clock
        self.entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.bytes = 0

    def put(self, response: Response, conversation: list) -> None:
        """Store a response, evicting the oldest entries to make room. One larger than the whole store
        is not kept (a later GET of it is a 404), and the log says so."""
        size = len(response.model_dump_json().encode()) + len(_ITEMS.dump_json(conversation))  # UTF-8 bytes
        if size > self.max_bytes:
            logger.warning("response %s (%d bytes) is larger than the response store (%d bytes); not stored",
                           response.id, size, self.max_bytes)
            return
        self.delete(response.id)
        self.entries[response.id] = StoredResponse(response, conversation, size, self.clock())
        self.bytes += size
        self._evict()

    def get(self, response_id: str) -> StoredResponse | None:
        self._evict()
        return self.entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Whether there was such a response."""
        entry = self.entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry is not None

    def _evict(self) -> None:
        expired_before = self.clock() - self.ttl_s
        while self.entries:
            oldest = next(iter(self.entries.values()))
            if (oldest.stored_at > expired_before and len(self.entries) <= self.max_entries
                    and self.bytes <= self.max_bytes):
                break
            self.delete(oldest.response.id)
