"""StopMatcher: chunking-independent stop matching, minimal hold-back, work linear in the new text."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine.sampling.stop_strings import StopMatcher, failure_function


def oracle(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Brute force over the whole text: the earliest-ending occurrence wins, ties to the longest stop."""
    found = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not found:
        return text, None
    end, _, stop = min(found)
    return text[:end if include else end - len(stop)], stop


def held_back(text: str, stops: list[str]) -> int:
    """Brute force: length of the longest suffix of text that is a prefix of some stop."""
    return max((n for n in range(len(text) + 1) for s in stops if s.startswith(text[len(text) - n:])), default=0)


def run(matcher: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = []
    for piece in pieces:
        released, stop = matcher.feed(piece)
        out.append(released)
        if stop is not None:
            return "".join(out), stop
    return "".join(out) + matcher.flush(), None


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(text))), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def test_failure_function():
    assert failure_function("abab") == [0, 0, 1, 2]
    assert failure_function("aabaaab") == [0, 1, 0, 1, 2, 2, 3]
    assert failure_function("x") == [0]


@settings(max_examples=400, deadline=None)
@given(text=st.text("abc", max_size=40),
       stops=st.lists(st.text("abc", min_size=1, max_size=5), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 40)), include=st.booleans())
def test_matches_brute_force_oracle_whatever_the_chunking(text, stops, cuts, include):
    matcher = StopMatcher(stops, include)
    released, fed = "", ""
    for piece in split(text, cuts):
        out, stop = matcher.feed(piece)
        released += out
        fed += piece
        if stop is not None:
            break
        # Everything but the longest suffix that may still become a stop is released.
        assert released == fed[:len(fed) - held_back(fed, stops)]
    else:
        released += matcher.flush()
        stop = None
    assert (released, stop) == oracle(text, stops, include)


@pytest.mark.parametrize("pieces", [["abcd"], ["ab", "cd"], ["a", "b", "c", "d"], ["abc", "d"]])
def test_earliest_ending_stop_wins_regardless_of_chunking(pieces):
    # "bc" ends inside "abcd"; the old earliest-start rule picked "abcd" only when "d" came with "bc".
    assert run(StopMatcher(["abcd", "bc"]), ["x", *pieces]) == ("xa", "bc")


def test_ties_go_to_the_longest_stop_and_include_keeps_it():
    assert run(StopMatcher(["bc", "abc"]), ["xab", "cz"]) == ("x", "abc")
    assert run(StopMatcher(["bc", "abc"], include_stop=True), ["xab", "cz"]) == ("xabc", "abc")


def test_partial_match_is_held_then_released_by_flush():
    matcher = StopMatcher(["aab"])
    assert matcher.feed("xaa") == ("x", None)
    assert matcher.feed("a") == ("a", None)  # "aaa": only the last "aa" can still start "aab"
    assert matcher.flush() == "aa"
    assert run(StopMatcher(["aab"]), ["xaa", "ab", "tail"]) == ("xa", "aab")


def test_no_stops_releases_everything():
    assert StopMatcher([]).feed("anything") == ("anything", None)
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])


class CountingList(list):
    """A failure table that counts its reads: one per failure-link step."""

    def __init__(self, items: list[int]) -> None:
        super().__init__(items)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


class CountingStr(str):
    """A stop string that counts its character reads: one per comparison with a fed character."""

    reads = 0

    def __getitem__(self, i):
        CountingStr.reads += 1
        return super().__getitem__(i)


def test_work_is_linear_in_new_text_with_a_long_stop():
    # Worst case for naive hold-back and for KMP alike: long runs that nearly match, then break.
    stops = [CountingStr(s) for s in ("a" * 999 + "b", "ab" * 500, "z" * 1000)]
    matcher = StopMatcher(stops)
    matcher._fail = [CountingList(f) for f in matcher._fail]
    CountingStr.reads = 0
    text = ("a" * 998 + "c" + "ab" * 499 + "c") * 40  # ~80k characters, never matching
    pieces = split(text, list(range(0, len(text), 7)) + list(range(3, len(text), 13)))
    fed = released = 0
    for piece in pieces:
        out, stop = matcher.feed(piece)
        assert stop is None
        fed += len(piece)
        released += len(out)
        # Per character and stop: at most 2 comparisons plus one per failure-link step, and failure steps
        # never outnumber earlier advances (at most one per character) -- whatever the stop length.
        work = CountingStr.reads + sum(f.reads for f in matcher._fail)
        assert work <= 4 * fed * len(stops)
        assert len(matcher._held) == fed - released < 1000  # only a possible stop prefix is held
    assert released + len(matcher.flush()) == len(text)
