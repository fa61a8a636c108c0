"""Tool calls out of generated text: the formats models are trained to emit, parsed whole or streamed.

A parser knows where the calls begin in a reply and how to read them. A tool format (Hermes, Llama 3's
JSON) is a parser that also describes itself and writes past calls back, for models whose chat template
knows no tools (see tools.py); `required` and named tool choices have parsers of their own, for the
JSON their grammar forces. Parsing is all or nothing: if any call in the text does not parse, the whole text is
the message's content, as vLLM's parsers do; so a stream may emit calls only once the text is complete,
and a streamed response always equals the non-streamed one.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _arguments(value: object) -> str | None:
    """A call's arguments as a JSON object string, or None if they are not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _call(obj: object, arguments_keys: tuple[str, ...]) -> ToolCall | None:
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and obj["name"]):
        return None
    key = next((k for k in arguments_keys if k in obj), None)
    arguments = _arguments(obj[key]) if key else "{}"
    return ToolCall(obj["name"], arguments) if arguments is not None else None


class ToolParser:
    """Where calls start in a message and how they read. Subclasses define the format."""

    def call_start(self, text: str) -> int | None:
        """Where the tool calls begin in text, or None if (so far) they do not."""
        raise NotImplementedError

    def undecided_suffix(self, text: str) -> int:
        """How many trailing characters of text might still turn out to open a call."""
        return 0

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        """The calls in text[call_start:], or None if any does not parse."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole message; without parseable calls the text is all content."""
        start = self.call_start(text)
        calls = self.parse_calls(text[start:]) if start is not None else None
        if not calls:
            return text, []
        return text[:start].rstrip() or None, calls


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

    name, arguments_key = "hermes", "arguments"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def call_start(self, text: str) -> int | None:
        i = text.find(self.OPEN)
        return i if i >= 0 else None

    def undecided_suffix(self, text: str) -> int:
        return next((k for k in range(min(len(self.OPEN) - 1, len(text)), 0, -1)
                     if text.endswith(self.OPEN[:k])), 0)

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        blocks = text.split(self.OPEN)
        if blocks[0].strip():
            return None
        calls = []
        for i, block in enumerate(blocks[1:], 1):
            body, closed, after = block.partition(self.CLOSE)
            if (not closed and i < len(blocks) - 1) or after.strip():
                return None
            try:
                call = _call(json.loads(body), ("arguments", "parameters"))
            except ValueError:
                return None
            if call is None:
                return None
            calls.append(call)
        return calls

    def render_calls(self, calls: list[dict]) -> str:
        return "\n".join(f"{self.OPEN}\n{json.dumps(c, ensure_ascii=False)}\n{self.CLOSE}" for c in calls)

    def instructions(self) -> str:
        return (f"To call a function, reply with one {self.OPEN}{self.CLOSE} block per call, each holding "
                f"a JSON object with the function's name and its arguments:\n"
                f'{self.OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n{self.CLOSE}')


class Llama3JsonParser(ToolFormat):
    """Llama 3.1/3.2's JSON tool calls: a reply that is `{"name": ..., "parameters": {...}}`, several
    joined by `;`, optionally after `<|python_tag|>`. Text that does not start with one is content."""

    name, arguments_key = "llama3_json", "parameters"
    TAG = "<|python_tag|>"

    def call_start(self, text: str) -> int | None:
        body = text.lstrip()
        return len(text) - len(body) if body.startswith((self.TAG, "{")) else None

    def undecided_suffix(self, text: str) -> int:
        body = text.lstrip()
        return len(text) if self.TAG.startswith(body) else 0  # an empty reply is undecided too

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        text = text.strip().removeprefix(self.TAG)
        decoder, pos, calls = json.JSONDecoder(), 0, []
        while True:
            while pos < len(text) and (text[pos].isspace() or (calls and text[pos] == ";")):
                pos += 1
            if pos == len(text):
                return calls or None
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError:
                return None
            call = _call(obj, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)

    def render_calls(self, calls: list[dict]) -> str:
        return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False)
                         for c in calls)

    def instructions(self) -> str:
        return ('To call a function, reply with only a JSON object with its name and arguments, '
                '{"name": "<function name>", "parameters": {<arguments as JSON>}}; '
                'for several calls, join the objects with "; ".')


class ForcedCallsParser(ToolParser):
    """tool_choice "required": the whole reply is a JSON array of calls, its form fixed by the grammar."""

    def __init__(self, arguments_key: str):
        self.arguments_key = arguments_key

    def call_start(self, text: str) -> int | None:
        return 0

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        try:
            objs = json.loads(text)
        except ValueError:  # cut short by max_tokens
            return None
        calls = [_call(obj, (self.arguments_key,)) for obj in objs] if isinstance(objs, list) else []
        return calls if calls and None not in calls else None


class NamedCallParser(ToolParser):
    """tool_choice naming a function: the whole reply is its arguments, as the grammar wrote them."""

    def __init__(self, name: str):
        self.name = name

    def call_start(self, text: str) -> int | None:
        return 0

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        return [ToolCall(self.name, text)]


TOOL_FORMATS: dict[str, type[ToolFormat]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}


def format_for_template(template: str | dict | None) -> ToolFormat:
    """The format a chat template's tool support expects; Hermes when it has none (the fallback prompt)."""
    source = " ".join(template.values()) if isinstance(template, dict) else template or ""
    if "<tool_call>" not in source and ("<|python_tag|>" in source or "ipython" in source):
        return Llama3JsonParser()
    return HermesParser()


class ToolCallStream:
    """One choice's text as it streams: content is released as soon as it cannot be the start of a
    call (trailing whitespace waits too, since content before calls loses it); from the first call
    on, the text is held, and at the end it is either calls or, if they do not parse, content."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.in_calls = False

    def feed(self, delta: str) -> str:
        """Add generated text; returns the content that can be sent now."""
        self.text += delta
        if self.in_calls:
            return ""
        start = self.parser.call_start(self.text)
        self.in_calls = start is not None
        safe = start if self.in_calls else len(self.text) - self.parser.undecided_suffix(self.text)
        safe = len(self.text[:safe].rstrip())
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the choice: (content not sent yet, calls)."""
        content, calls = self.parser.parse(self.text)
        return ("" if calls else self.text[self.sent:]), calls
