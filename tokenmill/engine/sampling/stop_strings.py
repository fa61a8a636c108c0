"""Stop-string matching over streamed text, linear in the new text.

Each stop string gets a Knuth-Morris-Pratt automaton. Its state is the length of the
longest suffix of the text so far that is a prefix of the stop; a match is the state
reaching the stop's length. Only newly generated characters are fed, once each, so a
step costs O(len(new text) * number of stops) amortized (a failure-link step undoes one
earlier advance), independent of stop length and of how much text came before.
"""
from __future__ import annotations

from collections import deque


def failure_function(stop: str) -> list[int]:
    """fail[i]: length of the longest proper prefix of stop[:i + 1] that is also its suffix."""
    fail = [0] * len(stop)
    q = 0
    for i in range(1, len(stop)):
        while q and stop[i] != stop[q]:
            q = fail[q - 1]
        if stop[i] == stop[q]:
            q += 1
        fail[i] = q
    return fail


class StopMatcher:
    """Finds the first stop string in streamed text and holds back what may still become one.

    Rule: the stop whose occurrence *ends* first in the whole text wins; among stops ending
    at the same character, the longest (the one starting earliest). This depends only on the
    text, never on how it was split into pieces. (The previous rule, earliest start within
    the held + new text, could pick differently when one stop ends inside another, e.g.
    stops "abcd" and "bc" on "abcd", depending on whether "d" arrived with "bc".)

    Text before the match is released (plus the stop with include_stop); without a match,
    the held-back tail is the longest suffix that is a proper prefix of some stop, and
    everything before it is released.
    """

    def __init__(self, stops: list[str], include_stop: bool = False) -> None:
        if not all(stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = list(stops)
        self._include = include_stop
        self._fail = [failure_function(s) for s in self._stops]
        self._state = [0] * len(self._stops)
        # Held-back characters, one per item, so releasing k of them costs O(k) however many are held.
        self._held: deque[str] = deque()

    def feed(self, text: str, match: bool = True) -> tuple[str, str | None]:
        """Add newly generated text; returns (text now safe to release, matched stop or None).

        With match False (min_tokens not reached yet) a stop ending in this text does not count: the
        automaton steps past it, so only stops that end in later text can stop generation.
        After a match nothing is held and the matcher must not be fed again.
        """
        if not self._stops:  # the common case: no per-character work
            return text, None
        for end, ch in enumerate(text, 1):
            best: str | None = None
            for k, stop in enumerate(self._stops):
                q, fail = self._state[k], self._fail[k]
                while q and stop[q] != ch:
                    q = fail[q - 1]
                if stop[q] == ch:
                    q += 1
                if q == len(stop):
                    if not match:
                        q = fail[q - 1]  # ignore this occurrence; keep its longest border
                    elif best is None or q > len(best):
                        best = stop
                self._state[k] = q
            if best is not None:
                # The stop fits in held + text[:end]: each state is at most the held length
                # when this feed began, plus one per character fed since.
                self._held.extend(text[:end])
                released = self._take(len(self._held) - (0 if self._include else len(best)))
                self._held.clear()
                return released, best
        self._held.extend(text)
        return self._take(len(self._held) - max(self._state)), None

    def flush(self) -> str:
        """The text ended without a match: release everything held back."""
        released = "".join(self._held)
        self._held.clear()
        return released

    def _take(self, n: int) -> str:
        """Release the first n held characters."""
        return "".join([self._held.popleft() for _ in range(n)])
