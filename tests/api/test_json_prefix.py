"""json_prefix.read_object resumes where its last read of the same text stopped: reading an object as it
grows gives, at every length, what a read from scratch gives."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.api import json_prefix

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(
    max_size=8)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


def _fresh(text: str, start: int) -> json_prefix.ObjectPrefix:
    json_prefix._READS.clear()
    return json_prefix.read_object(text, start)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), VALUES, max_size=5), st.text(max_size=3),
       st.lists(st.integers(1, 200), max_size=8))
def test_reading_an_object_as_it_grows_equals_reading_each_prefix_afresh(obj, lead, cuts):
    text = lead + json.dumps(obj) + " tail"
    start = len(lead)
    grown = []
    for end in sorted({min(c, len(text)) for c in cuts} | {len(text)}):
        grown.append((end, json_prefix.read_object(text[:end], start)))
    for end, read in grown:
        assert read == _fresh(text[:end], start)
    whole = _fresh(text, start)
    assert whole.valid and whole.end == start + len(json.dumps(obj))
    assert {k: v for k, (v, _, _) in whole.members.items()} == obj
