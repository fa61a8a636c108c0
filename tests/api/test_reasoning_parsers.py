"""Reasoning split off replies, whole and streamed, and the grammar of the reasoning section."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.api.output_parser import OutputParser
from tokenmill.api.reasoning_parsers import DeepSeekR1ReasoningParser, Qwen3ReasoningParser
from tokenmill.api.tool_parsers import HermesParser


@pytest.mark.parametrize("parser,text,reasoning,content", [
    (DeepSeekR1ReasoningParser, "<think>Let me see.</think>It is 4.", "Let me see.", "It is 4."),
    (DeepSeekR1ReasoningParser, "Let me see.</think>It is 4.", "Let me see.", "It is 4."),  # <think> was in the prompt
    (DeepSeekR1ReasoningParser, "Let me see, still", "Let me see, still", None),  # cut while thinking
    (DeepSeekR1ReasoningParser, "<think>a</think>", "a", None),
    (Qwen3ReasoningParser, "\n<think>Let me see.</think>\n\nIt is 4.", "Let me see.", "\n\nIt is 4."),
    (Qwen3ReasoningParser, "It is 4.", None, "It is 4."),  # thinking off: no <think>
    (Qwen3ReasoningParser, "It is </think> 4.", None, "It is </think> 4."),
    (Qwen3ReasoningParser, "<think>cut short", "cut short", None),
    (Qwen3ReasoningParser, "<thi", None, "<thi"),
])
def test_reasoning_is_the_text_in_think_tags(parser, text, reasoning, content):
    reply = OutputParser(reasoning=parser()).parse(text)
    assert (reply.reasoning, reply.content) == (reasoning, content)


def test_tool_calls_are_read_from_the_answer_only():
    text = '<think>I could write <tool_call>{"name": "g"}</tool_call></think>Sure.<tool_call>{"name": "f"}</tool_call>'
    reply = OutputParser(HermesParser(), reasoning=Qwen3ReasoningParser()).parse(text)
    assert reply.reasoning == 'I could write <tool_call>{"name": "g"}</tool_call>'
    assert reply.content == "Sure." and [c.name for c in reply.tool_calls] == ["f"]


REPLIES = ["<think>a < b </thin k></think>yes", " <think></think>", "x</think>y</think>z", "<think>", "<", "",
           "no thinking < here", "<think>half </th"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REPLIES), st.sampled_from([DeepSeekR1ReasoningParser, Qwen3ReasoningParser]),
       st.lists(st.integers(0, 40), max_size=8))
def test_a_streamed_reply_splits_where_the_whole_one_does(text, parser, cuts):
    stream = OutputParser(reasoning=parser())
    cuts = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [stream.feed(text[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)] + [stream.finish()]
    whole = OutputParser(reasoning=parser()).parse(text)
    assert "".join(d.reasoning for d in deltas) == (whole.reasoning or "")
    assert "".join(d.content for d in deltas) == (whole.content or "")


def test_a_partial_tag_waits_until_it_is_decided():
    stream = DeepSeekR1ReasoningParser()
    assert stream.feed("<thi") == ("", "")
    assert stream.feed("nk>so </th") == ("so ", "")
    assert stream.feed("ink>ok") == ("", "ok")


@pytest.mark.parametrize("parser", [DeepSeekR1ReasoningParser, Qwen3ReasoningParser])
def test_the_reasoning_grammar_takes_a_section_that_ends_at_the_first_end_tag(parser):
    """The EBNF accepts what the parser reads as reasoning, checked with xgrammar's own matcher over characters."""
    import xgrammar as xgr

    grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf(parser().prefix_grammar()), xgr.Grammar.from_regex("[A-Z]+"))

    def accepts(text: str) -> bool:
        matcher = xgr.testing._get_matcher_from_grammar(grammar)  # noqa: SLF001 - a character-level matcher
        return all(matcher.accept_string(ch) for ch in text) and matcher.is_terminated()

    assert accepts("<think>a <b> </thin</think>OK") and accepts("<think></think>OK")
    assert not accepts("<think>a</think>b</think>OK")
    assert accepts("OK") != parser.opens_in_prompt  # deepseek_r1 must close its reasoning first
    assert accepts("just thinking</think>OK") == parser.opens_in_prompt
