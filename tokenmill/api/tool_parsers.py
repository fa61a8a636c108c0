"""Tool calls out of generated text: the formats models are trained to emit, read as the text streams.

A parser knows where the calls begin in a reply and how they are laid out: what comes before the first
call's JSON object and what separates the next ones. A tool format (Hermes, Llama 3's JSON) is a parser that
also describes itself and writes past calls back, for models whose chat template knows no tools (see
tools.py); `required` and named tool choices have parsers of their own, for the JSON their grammar forces.

ToolCallStream reads one reply as it arrives. Content goes out as soon as it cannot be the start of a call.
From the first call on, each call goes out as its JSON object arrives: its id and name as soon as the name
is read, then its arguments object member by member, each piece checked (json_prefix.py) so that the pieces
always join into a valid start of an object. A call's arguments are the model's own text of that object (a
JSON string that holds an object: that string; none given: "{}"). What a stream has sent cannot be taken
back, so the same rules make the whole (non-streamed) reply, which is the fold of the stream:
- a call whose name has been read stands. If the text then stops (max_tokens) or stops making sense, its
  arguments are what had been read, which may be an unfinished object, and nothing after it is read;
- a first call that goes wrong, or that the reply ends in, before its name is read was not a call: the
  reply from there on is content, as a reply without calls is;
- once a call stands, text between and after calls that is not a call is dropped, and so are calls
  beyond max_calls (parallel_tool_calls=false).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .json_prefix import read_object


def partial_tag(text: str, tag: str) -> int:
    """How many trailing characters of text are the start of tag (and so may still become it)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=new_call_id)


@dataclass
class ToolCallDelta:
    """A piece of the index-th tool call: its id and name in the first piece, then argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class CallPrefix:
    """What is known of one call so far: its name once read, the argument text that can be sent, whether its
    object closed (then `end` is just past it) and whether it still reads as a call."""

    name: str | None
    arguments: str
    end: int | None = None
    valid: bool = True


def _object_text(value: object) -> str | None:
    """A JSON string's text when it is a JSON object, else None."""
    try:
        return value if isinstance(value, str) and isinstance(json.loads(value), dict) else None
    except ValueError:
        return None


def read_call(text: str, start: int, arguments_keys: tuple[str, ...]) -> CallPrefix:
    """The call whose JSON object begins at text[start], as far as text goes. Its name must be a non-empty
    string; its arguments are the first member under one of arguments_keys."""
    call = read_object(text, start)
    read = CallPrefix(call.members.get("name", (None,))[0], "", call.end, call.valid)
    if read.name is not None and not (isinstance(read.name, str) and read.name):
        read.name, read.valid = None, False
    key = next((k for k in call.members if k in arguments_keys), None)
    if key is not None:
        value, a, b = call.members[key]
        arguments = text[start + a:start + b] if isinstance(value, dict) else _object_text(value)
        ok = arguments is not None
    elif call.end is not None:
        arguments, ok = "{}", True
    else:
        arguments, ok = _partial_arguments(text, call.open, arguments_keys)
    read.arguments = arguments or ""
    read.valid = read.valid and ok and (read.name is not None or call.end is None)
    if not read.valid:
        read.end = None
    return read


def _partial_arguments(text: str, member: int, arguments_keys: tuple[str, ...]) -> tuple[str, bool]:
    """(the sendable text of an arguments object still arriving in the member at text[member:], "" if that
    member is something else; False if it went wrong). Gone wrong, the text is still its whole members so
    far: what a stream had sent, which the whole reply must hold too."""
    m = _OBJECT_MEMBER.match(text, member)
    try:
        if not m or json.loads(m.group(1)) not in arguments_keys:
            return "", True
    except ValueError:  # a key with a bad escape
        return "", False
    arguments = read_object(text, m.end() - 1)
    return text[arguments.start:arguments.done], arguments.valid


_OBJECT_MEMBER = re.compile(r'\s*("(?:[^"\\]|\\.)*")\s*:\s*\{')  # a member whose value is an object


class ToolParser:
    """Where calls start in a message and how they are laid out. Subclasses define the format: `opening`
    matches the text from the call start to the first call's "{", `separator` the text between calls."""

    arguments_keys: tuple[str, ...]
    opening: re.Pattern
    separator: re.Pattern

    def call_start(self, text: str) -> int | None:
        """Where the tool calls begin in text, or None if (so far) they do not."""
        raise NotImplementedError

    def undecided_suffix(self, text: str) -> int:
        """How many trailing characters of text might still turn out to open a call."""
        return 0

    def read_calls(self, text: str) -> tuple[list[CallPrefix], bool]:
        """(the calls in text, which starts at the call start, as far as it goes; whether the text after the
        last of them already cannot be a call). Reading stops at a call that went wrong."""
        calls: list[CallPrefix] = []
        pos = 0
        while not calls or calls[-1].end is not None:
            brace = text.find("{", pos)
            if brace < 0:
                return calls, False
            if not (self.separator if calls else self.opening).fullmatch(text, pos, brace):
                return calls, True
            calls.append(read_call(text, brace, self.arguments_keys))
            pos = calls[-1].end
        return calls, not calls[-1].valid


class ToolFormat(ToolParser):
    """A format a model writes calls in of its own accord (tool_choice "auto")."""

    name: str
    arguments_key: str  # the key of a call's arguments

    def render_calls(self, calls: list[dict]) -> str:
        """Past calls ({"name", "arguments": dict}) as the model would have written them."""
        raise NotImplementedError

    def instructions(self) -> str:
        """How to write a call, for a prompt that lists the tools (tools.py)."""
        raise NotImplementedError


class HermesParser(ToolFormat):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call, after any text:
    Hermes 2 Pro, Qwen2.5 and Qwen3, SmolLM3, and tokenmill's fallback prompt. The last block may
    lack its closing tag (the model stopped at end of turn)."""

    name, arguments_key, arguments_keys = "hermes", "arguments", ("arguments", "parameters")
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    opening = re.compile(r"<tool_call>\s*")
    separator = re.compile(r"\s*</tool_call>\s*<tool_call>\s*")

    def call_start(self, text: str) -> int | None:
        i = text.find(self.OPEN)
        return i if i >= 0 else None

    def undecided_suffix(self, text: str) -> int:
        return partial_tag(text, self.OPEN)

    def render_calls(self, calls: list[dict]) -> str:
        return "\n".join(f"{self.OPEN}\n{json.dumps(c, ensure_ascii=False)}\n{self.CLOSE}" for c in calls)

    def instructions(self) -> str:
        return (f"To call a function, reply with one {self.OPEN}{self.CLOSE} block per call, each holding "
                f"a JSON object with the function's name and its arguments:\n"
                f'{self.OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n{self.CLOSE}')


class Llama3JsonParser(ToolFormat):
    """Llama 3.1/3.2's JSON tool calls: a reply that is `{"name": ..., "parameters": {...}}`, several
    joined by `;`, optionally after `<|python_tag|>`. Text that does not start with one is content."""

    name, arguments_key, arguments_keys = "llama3_json", "parameters", ("parameters", "arguments")
    TAG = "<|python_tag|>"
    opening = re.compile(r"\s*(<\|python_tag\|>)?\s*")
    separator = re.compile(r"[\s;]*")

    def call_start(self, text: str) -> int | None:
        body = text.lstrip()
        return len(text) - len(body) if body.startswith((self.TAG, "{")) else None

    def undecided_suffix(self, text: str) -> int:
        body = text.lstrip()
        return len(text) if self.TAG.startswith(body) else 0  # an empty reply is undecided too

    def render_calls(self, calls: list[dict]) -> str:
        return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False)
                         for c in calls)

    def instructions(self) -> str:
        return ('To call a function, reply with only a JSON object with its name and arguments, '
                '{"name": "<function name>", "parameters": {<arguments as JSON>}}; '
                'for several calls, join the objects with "; ".')


class ForcedCallsParser(ToolParser):
    """tool_choice "required": the whole reply is a JSON array of calls, its form fixed by the grammar."""

    opening = re.compile(r"\s*\[\s*")
    separator = re.compile(r"\s*,\s*")

    def __init__(self, arguments_key: str):
        self.arguments_keys = (arguments_key,)

    def call_start(self, text: str) -> int | None:
        return 0


class NamedCallParser(ToolParser):
    """tool_choice naming a function: the whole reply is its arguments, as the grammar wrote them; the call
    stands from the start."""

    def __init__(self, name: str):
        self.name = name

    def call_start(self, text: str) -> int | None:
        return 0

    def read_calls(self, text: str) -> tuple[list[CallPrefix], bool]:
        return [CallPrefix(self.name, text)], False


TOOL_FORMATS: dict[str, type[ToolFormat]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}


def format_for_template(template: str | dict | None) -> ToolFormat:
    """The format a chat template's tool support expects; Hermes when it has none (the fallback prompt)."""
    source = " ".join(template.values()) if isinstance(template, dict) else template or ""
    if "<tool_call>" not in source and ("<|python_tag|>" in source or "ipython" in source):
        return Llama3JsonParser()
    return HermesParser()


class ToolCallStream:
    """One choice's text as it streams (the rules are in the module's docstring): content is released as
    soon as it cannot be the start of a call (trailing whitespace waits too, since content before calls
    loses it); from the call start on, calls go out as they are read."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None):
        self.parser = parser
        self.max_calls = max_calls
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.start: int | None = None  # where the calls begin, once they do
        self.as_content = False  # the calls turned out not to be: the rest is content
        self.calls: list[ToolCallDelta] = []  # per call sent: its id, name and the arguments sent so far

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        """Add generated text; returns the content and call pieces that can be sent now."""
        self.text += delta
        if self.start is None:
            self.start = self.parser.call_start(self.text)
            if self.start is None:
                return self._content(len(self.text) - self.parser.undecided_suffix(self.text)), []
        calls = self._calls(final=False)
        return self._content(self.start), calls

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the choice: the content and call pieces not sent yet."""
        if self.start is None:
            return self._content(len(self.text), strip=False), []
        calls = self._calls(final=True)
        return self._content(self.start, strip=False) if self.as_content else "", calls

    def _content(self, safe: int, strip: bool = True) -> str:
        """The content up to text[:safe] not sent yet: all the text from the call start on, once the calls
        turned out not to be; without its trailing whitespace while strip (it may precede a call)."""
        if self.as_content:
            safe = len(self.text)
        if strip:
            safe = len(self.text[:safe].rstrip())
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out

    def _calls(self, final: bool) -> list[ToolCallDelta]:
        if self.as_content:
            return []
        calls, broken = self.parser.read_calls(self.text[self.start:])
        calls = calls[:self.max_calls] if self.max_calls is not None else calls
        if not self.calls and not (calls and calls[0].name) and (final or broken):
            self.as_content = True  # the first call went wrong before its name was read
            return []
        out = []
        for i, call in enumerate(calls):
            if call.name is None:
                break
            if i == len(self.calls):
                self.calls.append(ToolCallDelta(i, new_call_id(), call.name))
                out.append(ToolCallDelta(i, self.calls[i].id, call.name, call.arguments))
            elif len(call.arguments) > len(self.calls[i].arguments):
                assert call.arguments.startswith(self.calls[i].arguments), "sent arguments changed"
                out.append(ToolCallDelta(i, arguments=call.arguments[len(self.calls[i].arguments):]))
            self.calls[i].arguments = call.arguments
        return out
