"""Reasoning out of generated text: what a thinking model writes between `<think>` and `</think>` is its
reasoning, what follows is its answer (content and tool calls, read from the answer only).

--reasoning-parser picks the model family's rule, as vLLM's parsers of the same names:
- deepseek_r1: DeepSeek-R1's chat template opens `<think>` in the prompt, so a reply may start inside its
  reasoning with no `<think>` (a `<think>` the reply does start with is dropped). A reply without
  `</think>` is all reasoning (it was cut, or never finished thinking).
- qwen3: Qwen3 thinks only when the reply starts with `<think>` (after whitespace); otherwise (thinking
  turned off, or a model that never thinks) the reply is all answer. A reply that opened `<think>` and
  stops before `</think>` is all reasoning.

A stream holds back the text that may still be a tag (`<thi` at the end of a delta) until it is decided,
so a streamed reply always splits where the whole one does. A constrained reply (structured outputs, a
forced tool call) is constrained in its answer only: `prefix_grammar` is the reasoning section that the
engine lets through before the constraint applies.
"""
from __future__ import annotations

from .tool_parsers import partial_tag

START, END = "<think>", "</think>"


def _not_containing(tag: str) -> str:
    """EBNF rules `r0`..: any text in which tag does not occur (rule rK: the last K characters read are
    tag's first K). The rules assume tag's first character occurs nowhere else in it, true of `</think>`."""
    assert tag[0] not in tag[1:]
    first = _ebnf_char(tag[0])
    rules = [f'r0 ::= "" | [^{first}] r0 | "{first}" r1']
    for k in range(1, len(tag)):
        nxt = _ebnf_char(tag[k])
        advance = f' | "{nxt}" r{k + 1}' if k + 1 < len(tag) else ""
        rules.append(f'r{k} ::= "" | "{first}" r1{advance} | [^{first}{nxt}] r0')
    return "\n".join(rules)


def _ebnf_char(c: str) -> str:
    return "\\" + c if c in '\\"[]^-' else c


class ReasoningParser:
    """One reply's text as it streams: feed(text) -> (reasoning, answer) that can be sent now; finish()
    gives the rest. `opens_in_prompt`: the reply starts inside its reasoning (deepseek_r1)."""

    name: str
    opens_in_prompt: bool

    def __init__(self) -> None:
        self.pending = ""  # text not decided yet
        self.state = "start"  # then "reasoning" or "answer"

    def feed(self, text: str) -> tuple[str, str]:
        """Add generated text; returns the (reasoning, answer) that can be sent now."""
        self.pending += text
        reasoning = ""
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(START):
                self.pending, self.state = head[len(START):], "reasoning"
            elif not START.startswith(head):
                self.state = "reasoning" if self.opens_in_prompt else "answer"
        if self.state == "reasoning":
            before, end, after = self.pending.partition(END)
            if end:
                reasoning, self.pending, self.state = before, after, "answer"
            else:
                cut = len(self.pending) - partial_tag(self.pending, END)
                reasoning, self.pending = self.pending[:cut], self.pending[cut:]
        if self.state == "answer":
            answer, self.pending = self.pending, ""
            return reasoning, answer
        return reasoning, ""

    def finish(self) -> tuple[str, str]:
        """At the end of the reply: what was held back, as reasoning or answer."""
        rest, self.pending = self.pending, ""
        thinking = self.state == "reasoning" or (self.state == "start" and self.opens_in_prompt)
        return (rest, "") if thinking else ("", rest)

    def prefix_grammar(self) -> str:
        """EBNF of the reasoning section a reply may open with, before a constrained answer."""
        thinking = f'"{START}"? reasoning "{END}"' if self.opens_in_prompt else f'("{START}" reasoning "{END}")?'
        return f"root ::= {thinking}\nreasoning ::= r0\n{_not_containing(END)}"


class DeepSeekR1ReasoningParser(ReasoningParser):
    name, opens_in_prompt = "deepseek_r1", True


class Qwen3ReasoningParser(ReasoningParser):
    name, opens_in_prompt = "qwen3", False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (DeepSeekR1ReasoningParser,
                                                                              Qwen3ReasoningParser)}
