"""One choice's generated text, read once for every API: reasoning, answer content and tool calls.

Each API (chat completions, Responses, Messages) feeds a choice's text deltas to an OutputParser and
renders what comes back in its own shapes. The whole (non-streamed) reply is the fold of the same
deltas (`parse`), so a streamed reply always equals the non-streamed one. The reasoning parser
(reasoning_parsers.py) splits the text first; tool calls are read from the answer only, and stream as
they are generated (tool_parsers.py has the rules for calls cut short or that do not parse).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .reasoning_parsers import ReasoningParser
from .tool_parsers import ToolCall, ToolCallDelta, ToolCallStream, ToolParser

__all__ = ["OutputDelta", "OutputParser", "ParsedOutput", "ToolCallDelta"]


@dataclass
class OutputDelta:
    """What a piece of generated text adds to the reply."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def __add__(self, later: OutputDelta) -> OutputDelta:
        return OutputDelta(self.reasoning + later.reasoning, self.content + later.content,
                           self.tool_calls + later.tool_calls)


@dataclass
class ParsedOutput:
    """A whole reply: None where it has no reasoning or no content."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, delta: OutputDelta) -> None:
        if delta.reasoning:
            self.reasoning = (self.reasoning or "") + delta.reasoning
        if delta.content:
            self.content = (self.content or "") + delta.content
        for d in delta.tool_calls:
            if d.index == len(self.tool_calls):
                self.tool_calls.append(ToolCall(d.name or "", "", id=d.id or ""))
            self.tool_calls[d.index].arguments += d.arguments


class OutputParser:
    """One choice's text as it streams. tool_parser (None: the answer is all content) finds the calls;
    max_calls (None: any number) keeps only the first calls, as parallel_tool_calls=false asks;
    reasoning (None: no reasoning) splits the reasoning off first."""

    def __init__(self, tool_parser: ToolParser | None = None, max_calls: int | None = None,
                 reasoning: ReasoningParser | None = None):
        self.tools = ToolCallStream(tool_parser, max_calls) if tool_parser else None
        self.reasoning = reasoning

    def feed(self, text: str) -> OutputDelta:
        """Add generated text; returns what can be sent now."""
        reasoning, answer = self.reasoning.feed(text) if self.reasoning else ("", text)
        return OutputDelta(reasoning) + self._answer(answer)

    def finish(self) -> OutputDelta:
        """At the end of the choice: whatever was held back."""
        reasoning, answer = self.reasoning.finish() if self.reasoning else ("", "")
        out = OutputDelta(reasoning) + self._answer(answer)
        if self.tools:
            content, calls = self.tools.finish()
            out += OutputDelta(content=content, tool_calls=calls)
        return out

    def _answer(self, text: str) -> OutputDelta:
        if not self.tools:
            return OutputDelta(content=text)
        content, calls = self.tools.feed(text)
        return OutputDelta(content=content, tool_calls=calls)

    def parse(self, text: str) -> ParsedOutput:
        """A whole reply: the fold of feeding it all at once."""
        whole = ParsedOutput()
        whole.add(self.feed(text))
        whole.add(self.finish())
        return whole
