"""--reasoning-parser end to end: a reply's reasoning in reasoning_content, its answer in content, streamed
the same as whole, and a constraint that binds the answer only. SmolLM2 was never trained to think; two
earlier turns that do are enough for it to write a `<think>` section and close it."""
import re

import openai
import pytest
from api_helpers import ServerThread

from tokenmill.api.server import build_app

SHOTS = [{"role": "user", "content": "What is two plus two?"},
         {"role": "assistant", "content": "<think>two plus two is four</think>Four"},
         {"role": "user", "content": "What color is the sky?"},
         {"role": "assistant", "content": "<think>the sky is blue</think>Blue"},
         {"role": "user", "content": "What is the capital of France?"}]
ANSWER = "[A-Z][a-z ]{3,30}"


@pytest.fixture(scope="module")
def thinking(engine, server) -> openai.OpenAI:
    """A client of an app over the test engine whose replies go through the deepseek_r1 reasoning parser."""
    with ServerThread(build_app(engine, served_model_name="tm-thinking", owns_engine=False,
                                reasoning_parser="deepseek_r1")) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model="tm-thinking", messages=SHOTS, temperature=0, max_tokens=60,
                                          extra_body={"structured_outputs": {"regex": ANSWER},
                                                      "return_token_ids": True}, **kwargs)


def test_reasoning_and_answer_are_split_and_the_constraint_binds_the_answer(thinking, engine):
    choice = _ask(thinking).choices[0]
    reasoning, content = choice.message.reasoning_content, choice.message.content
    assert reasoning and re.fullmatch(ANSWER, content), (reasoning, content)
    # The oracle: the tokens the engine generated, decoded, are the two parts around the tags.
    text = engine.engine.get_tokenizer().decode(choice.token_ids, skip_special_tokens=True)
    assert text in (f"<think>{reasoning}</think>{content}", f"{reasoning}</think>{content}")


def test_streamed_reasoning_and_content_equal_the_whole_reply(thinking):
    whole = _ask(thinking).choices[0].message
    reasoning, content, reasoning_chunks = "", "", 0
    for chunk in _ask(thinking, stream=True):
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            reasoning_chunks += bool(getattr(c.delta, "reasoning_content", None))
            content += c.delta.content or ""
    assert (reasoning, content) == (whole.reasoning_content, whole.content)
    assert reasoning_chunks > 1  # reasoning streams as it is generated


def test_without_a_reasoning_parser_replies_have_no_reasoning_field(http, model_name):
    body = {"model": model_name, "messages": SHOTS, "temperature": 0, "max_tokens": 30}
    message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"].startswith("<think>")


def test_responses_api_gives_the_reasoning_as_a_reasoning_item_before_the_message(thinking):
    chat = _ask(thinking).choices[0].message
    response = thinking.responses.create(model="tm-thinking", input=SHOTS, temperature=0, max_output_tokens=60,
                                         extra_body={"structured_outputs": {"regex": ANSWER}})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert "".join(c.text for c in response.output[0].content) == chat.reasoning_content
    assert response.output_text == chat.content
    streamed = thinking.responses.create(model="tm-thinking", input=SHOTS, temperature=0, max_output_tokens=60,
                                         extra_body={"structured_outputs": {"regex": ANSWER}}, stream=True)
    final = [e.response for e in streamed if e.type == "response.completed"][0]
    assert [i.model_dump(exclude={"id"}) for i in final.output] == [
        i.model_dump(exclude={"id"}) for i in response.output]


def test_messages_api_gives_the_reasoning_as_a_thinking_block_when_thinking_is_enabled(thinking):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=str(thinking.base_url).removesuffix("/v1/"), api_key="unused",
                                 max_retries=0)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    chat = thinking.chat.completions.create(
        model="tm-thinking", messages=SHOTS, temperature=0, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}).choices[0]
    ask = {"model": "tm-thinking", "messages": SHOTS, "max_tokens": 80, "extra_body": {"temperature": 0},
           "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    message = client.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **ask)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert (message.content[0].thinking, message.content[1].text) == (chat.message.reasoning_content,
                                                                       chat.message.content)
    with client.messages.stream(thinking={"type": "enabled", "budget_tokens": 1024}, **ask) as stream:
        streamed = stream.get_final_message().content  # the SDK's accumulator gives ParsedTextBlocks
    assert [b.model_dump(include={"type", "thinking", "signature", "text"}) for b in streamed] == [
        b.model_dump(include={"type", "thinking", "signature", "text"}) for b in message.content]
    hidden = client.messages.create(**ask)  # thinking not asked for: the answer alone
    assert [b.type for b in hidden.content] == ["text"] and hidden.content[0].text == chat.message.content
