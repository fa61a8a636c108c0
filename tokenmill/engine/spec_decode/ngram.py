"""N-gram (prompt lookup) proposals: continue the sequence the way its own text went on before.

For the last n tokens of a sequence (n from prompt_lookup_max down to prompt_lookup_min), find where the
same n tokens last occurred earlier in its prompt or output, and propose the tokens that followed them.
Text a model copies or lightly edits (a passage to rewrite, code to refactor, a document to quote) is
mostly such continuations.
"""
from __future__ import annotations


class NgramIndex:
    """One sequence's n-grams, each mapped to the position where its latest occurrence ends.

    Updated with the tokens appended since the last proposal, so a step costs O(new tokens * n sizes), not
    O(sequence length). The n-grams ending at the last position are the query, never the answer: an
    occurrence counts only with a token after it."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.last_end: dict[tuple[int, ...], int] = {}  # n-grams of every size in one dict: lengths differ
        self.num_indexed = 0  # n-grams ending before this position are indexed

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        end = len(tokens) - 1
        for e in range(self.num_indexed, end):
            for n in range(self.min_n, min(self.max_n, e + 1) + 1):
                self.last_end[tuple(tokens[e - n + 1:e + 1])] = e
        self.num_indexed = max(self.num_indexed, end)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            e = self.last_end.get(tuple(tokens[-n:]))
            if e is not None:
                return tokens[e + 1:e + 1 + k]
        return []
