"""A JSON object read as far as its text has arrived: the members that are whole, each checked, and
where the next one begins, so that a stream can send an object's text member by member and never send a
piece that a later one proves wrong.

Members are found by structure alone (strings, nesting, the object's own commas), then each is checked
with the json module on its own; a member is whole once the comma or brace after it has arrived, since
until then a number or the last string may still grow.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field

# A string (its closing quote in group 1: absent while the string is still arriving), or a structural character.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*(")?|[{}\[\],]')
_KEY = re.compile(r'\s*"(?:[^"\\]|\\.)*"\s*:\s*')


@dataclass
class ObjectPrefix:
    """What is known of an object whose text begins at `start` (its "{").

    members: key -> (value, where its text starts, where it ends, counted from `start`), in the order they
    came, the first of a repeated key. done: the end of the whole members (before the comma that follows
    them), a valid object once closed by "}". open: where the member being read begins. end: just past the
    closing brace, once it came. valid: False once the text cannot be the start of a JSON object.
    """

    start: int
    members: dict[str, tuple[object, int, int]] = field(default_factory=dict)
    done: int = 0
    open: int = 0
    end: int | None = None
    valid: bool = True


# The reads of objects still arriving, by their text as far as it was scanned (from the "{"): a stream reads
# its object again at each delta, and resuming where the last read stopped keeps that O(delta), not
# O(object). Bounded; an entry is (members, done, open, end, depth, scanned), positions counted from the "{".
_READS: OrderedDict[str, tuple] = OrderedDict()
_MAX_READS = 64


def read_object(text: str, start: int) -> ObjectPrefix:
    """The object whose "{" is text[start], as far as text goes."""
    read, depth, scanned = _resume(text, start)
    if read.end is not None:
        return read
    for m in _TOKEN.finditer(text, scanned):
        token = m.group()
        if token[0] == '"':
            if m.group(1) is None:  # a string still arriving
                break
        elif token in "{[":
            depth += 1
        elif depth:
            depth -= token != ","
        else:  # "," or "}" (or a stray "]") of the object itself
            closing = token == "}"
            if token == "]" or not _add_member(read, text, m.start(), closing):
                read.valid = False
                break
            if closing:
                read.done = read.end = m.end()
                scanned = m.end()
                break
            read.done, read.open = m.start(), m.end()
        scanned = m.end()
    if read.valid:
        _remember(text, read, depth, scanned)
    return read


def _resume(text: str, start: int) -> tuple[ObjectPrefix, int, int]:
    """(the longest earlier read of this object's text, moved to start; the nesting depth and the position
    where its scan stopped); else a read of nothing yet."""
    known = max((prefix for prefix in _READS if text.startswith(prefix, start)), key=len, default=None)
    if known is None:
        return ObjectPrefix(start, done=start + 1, open=start + 1), 0, start + 1
    _READS.move_to_end(known)
    members, done, open_, end, depth, scanned = _READS[known]
    read = ObjectPrefix(start, dict(members), done + start, open_ + start, end + start if end is not None else None)
    return read, depth, scanned + start


def _remember(text: str, read: ObjectPrefix, depth: int, scanned: int) -> None:
    start = read.start
    if scanned <= start + 1:
        return
    _READS[text[start:scanned]] = (dict(read.members), read.done - start, read.open - start,
                                   read.end - start if read.end is not None else None, depth, scanned - start)
    _READS.move_to_end(text[start:scanned])
    while len(_READS) > _MAX_READS:
        _READS.popitem(last=False)


def _add_member(read: ObjectPrefix, text: str, stop: int, closing: bool) -> bool:
    """Check the member in text[read.open:stop]; False if it is not one (an empty one only closes `{}`)."""
    span = text[read.open:stop]
    if not span.strip():
        return closing and read.open == read.start + 1
    member = _member(span)
    if member is None:
        return False
    key, value, key_len = member
    at = read.open - read.start
    read.members.setdefault(key, (value, at + key_len, at + len(span.rstrip())))
    return True


def _member(span: str) -> tuple[str, object, int] | None:
    """(key, value, length of the key and colon) of one object member's text, or None if it is not one."""
    try:  # NaN and Infinity are no JSON: clients' parsers refuse them
        member = json.loads("{" + span + "}", parse_constant=_no_constant)
    except ValueError:
        return None
    if len(member) != 1:  # a single member: the object's own commas separate members
        return None
    (key, value), = member.items()
    return key, value, _KEY.match(span).end()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
