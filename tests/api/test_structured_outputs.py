"""Structured outputs through the official OpenAI SDK against a real server: the SDK's parse() with a
pydantic model, json_schema streamed, json_object, vLLM's structured_outputs and guided_* fields,
constrained and free requests sharing steps, and a constraint that does not compile in time."""
import asyncio
import dataclasses
import json

from pydantic import BaseModel

from tokenmill.engine.limits import RequestLimits

MESSAGES = [{"role": "user", "content": "Give me a person as JSON."}]


class Person(BaseModel):
    name: str
    age: int


def test_sdk_parse_with_a_pydantic_model(client, model_name):
    completion = client.chat.completions.parse(model=model_name, messages=MESSAGES, response_format=Person,
                                               temperature=0, max_tokens=300)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person)
    assert message.parsed == Person.model_validate_json(message.content)


def test_json_schema_streamed_is_the_same_json_as_not_streamed(client, model_name):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema(),
                                                  "strict": True}}
    whole = client.chat.completions.create(model=model_name, messages=MESSAGES, response_format=fmt,
                                           temperature=0, max_tokens=300)
    stream = client.chat.completions.create(model=model_name, messages=MESSAGES, response_format=fmt,
                                            temperature=0, max_tokens=300, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content
    assert set(json.loads(text)) == {"name", "age"}


def test_json_object_and_vllms_fields_on_both_endpoints(client, model_name):
    paris = [{"role": "user", "content": "Reply in JSON with the keys city and country for Paris."}]
    chat = client.chat.completions.create(model=model_name, messages=paris, temperature=0, max_tokens=300,
                                          response_format={"type": "json_object"})
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    choice = client.completions.create(model=model_name, prompt="Is the sky blue? Answer:", temperature=0,
                                       max_tokens=5, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no")
    regex = client.completions.create(model=model_name, prompt="A year:", temperature=0, max_tokens=10,
                                      extra_body={"guided_regex": r"(19|20)\d\d"})
    assert len(regex.choices[0].text) == 4 and regex.choices[0].text.isdigit()


def test_constrained_and_free_requests_in_one_batch(async_client, model_name):
    free = {"model": model_name, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 24}

    async def run():
        client = async_client()
        alone = await client.completions.create(**free)
        constrained = [client.completions.create(model=model_name, prompt=f"Person {i} as JSON:", temperature=0,
                                                 max_tokens=200, extra_body={"guided_json": Person.model_json_schema()})
                       for i in range(3)]
        results = await asyncio.gather(client.completions.create(**free), *constrained)
        return alone, results

    alone, (together, *people) = asyncio.run(run())
    assert together.choices[0].text == alone.choices[0].text
    for p in people:
        Person.model_validate_json(p.choices[0].text)


def test_a_schema_slower_to_compile_than_the_bound_is_a_400_naming_its_field(http, engine, monkeypatch):
    monkeypatch.setattr(engine.engine, "config", dataclasses.replace(
        engine.engine.config, limits=RequestLimits(max_constraint_compile_s=1e-4)))
    schema = {"type": "object", "properties": {f"bounded_{i}": {"type": "integer"} for i in range(30)}}
    resp = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, "response_format": {
        "type": "json_schema", "json_schema": {"name": "slow", "schema": schema}}})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "response_format" and "did not compile within 0.0001 s" in error["message"]
