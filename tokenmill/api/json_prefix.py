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
from dataclasses import dataclass, field

# A string (its closing quote in group 1: absent while the string is still arriving), or a structural character.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*(")?|[{}\[\],]')
_KEY = re.compile(r'\s*"(?:[^"\\]|\\.)*"\s*:\s*')


@dataclass
class ObjectPrefix:
    """What is known of an object whose text begins at `start` (its "{").

    members: key -> (value, where its text starts, where it ends), in the order they came, the first of a
    repeated key. done: the end of the whole members (before the comma that follows them), a valid object
    once closed by "}". open: where the member being read begins. end: just past the closing brace, once
    it came. valid: False once the text cannot be the start of a JSON object.
    """

    start: int
    members: dict[str, tuple[object, int, int]] = field(default_factory=dict)
    done: int = 0
    open: int = 0
    end: int | None = None
    valid: bool = True


def read_object(text: str, start: int) -> ObjectPrefix:
    """The object whose "{" is text[start], as far as text goes."""
    read = ObjectPrefix(start, done=start + 1, open=start + 1)
    depth = 0
    for m in _TOKEN.finditer(text, start + 1):
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
                break
            read.done, read.open = m.start(), m.end()
    return read


def _add_member(read: ObjectPrefix, text: str, stop: int, closing: bool) -> bool:
    """Check the member in text[read.open:stop]; False if it is not one (an empty one only closes `{}`)."""
    span = text[read.open:stop]
    if not span.strip():
        return closing and read.open == read.start + 1
    try:  # NaN and Infinity are no JSON: clients' parsers refuse them
        member = json.loads("{" + span + "}", parse_constant=_no_constant)
    except ValueError:
        return False
    (key, value), = member.items()  # a single member: the object's own commas separate members
    value_start = read.open + _KEY.match(span).end()
    read.members.setdefault(key, (value, value_start, read.open + len(span.rstrip())))
    return True


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
