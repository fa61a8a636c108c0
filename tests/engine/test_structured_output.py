"""Structured outputs in the engine: constrained rows follow their grammar, free rows in the same batch are
untouched, preemption keeps the grammar state, a bad or too slow constraint is a ValueError before the request
takes anything, and a compiling constraint does not hold up other requests."""
import asyncio
import dataclasses
import json
import threading

import pytest

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.core.async_engine import AsyncLLMEngine
from tokenmill.engine.limits import InvalidRequestError, RequestLimits
from tokenmill.engine.sampling.structured_output import StructuredOutputsParams

pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}

# Sampling can run a free string on for ever; the schema's own bounds keep it short.
SHORT_PERSON = {**PERSON, "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                  "maxItems": 2}}}


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_num_seqs=8)


def _greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=kwargs.pop("max_tokens", 300), **kwargs)


def test_json_schema_output_parses_and_fits_while_free_rows_of_the_batch_are_unchanged(llm):
    prompts = ["Describe a person as JSON.", "The capital of France is"]
    free = _greedy(max_tokens=24, ignore_eos=True)
    both = llm.generate(prompts, [_greedy(structured_outputs={"json": PERSON}), free], use_tqdm=False)
    person = json.loads(both[0].outputs[0].text)
    assert list(person) == ["name", "age", "tags"] and isinstance(person["age"], int)  # the schema's order
    assert all(isinstance(t, str) for t in person["tags"])
    assert both[0].outputs[0].finish_reason == "stop"
    alone = llm.generate(prompts[1:], [free], use_tqdm=False)
    assert both[1].outputs[0].token_ids == alone[0].outputs[0].token_ids


@pytest.mark.parametrize("constraint,check", [
    ({"regex": r"\d{3}-\d{4}"}, lambda s: len(s) == 8 and s[3] == "-" and s.replace("-", "").isdigit()),
    ({"choice": ["yes", "no", "maybe"]}, lambda s: s in ("yes", "no", "maybe")),
    ({"json_object": True}, lambda s: isinstance(json.loads(s), dict)),
    ({"json": {}}, lambda s: json.loads(s) is not None or s == "null"),  # the empty schema: any JSON value
    ({"grammar": 'root ::= "(" [a-z]+ ")"'}, lambda s: s[0] == "(" and s[-1] == ")" and s[1:-1].isalpha()),
])
def test_each_kind_of_constraint_holds(llm, constraint, check):
    out = llm.generate(["Answer: "], _greedy(max_tokens=100, structured_outputs=constraint), use_tqdm=False)
    assert check(out[0].outputs[0].text), out[0].outputs[0].text


def test_sampled_constrained_outputs_all_parse(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=300, structured_outputs={"json": SHORT_PERSON})
    for o in llm.generate(["A person:"], params, use_tqdm=False)[0].outputs:
        assert o.finish_reason == "stop"
        person = json.loads(o.text)
        assert set(person) == {"name", "age", "tags"} and len(person["name"]) <= 12 and len(person["tags"]) <= 2


@pytest.mark.parametrize("bad,message", [
    ({"json": {"type": "nonsense"}}, "structured_outputs.json: Unsupported type"),
    ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
    ({"regex": "(("}, "structured_outputs.regex: Regex parsing error"),
    ({"grammar": "root ::= "}, "structured_outputs.grammar: EBNF parser error"),
    ({"regex": "\U000ad1fd\u00ce"}, "structured_outputs.regex: no token of the model's vocabulary can begin it"),
    ({"regex": "[A-Z]+", "prefix_grammar": "root ::= ("}, "structured_outputs.prefix_grammar: EBNF parser error"),
])
def test_an_invalid_constraint_fails_before_the_request_takes_anything(llm, bad, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["x"], SamplingParams(structured_outputs=bad), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.scheduler.block_manager.num_blocks


@pytest.mark.parametrize("fields", [{}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"regex": ""}])
def test_structured_outputs_takes_exactly_one_valid_constraint(fields):
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**fields)


def test_constrained_requests_preempted_mid_output_give_the_same_tokens(llm, monkeypatch):
    # 10 blocks of 16 tokens cannot hold six sequences of ~20-50 tokens: the newest, constrained, are preempted
    # (recomputed, their prompts often from the prefix cache) and their grammar state must follow.
    small = LLM(dtype="float32", kv_cache_memory=10 * 2 * 30 * 16 * 3 * 64 * 4, max_num_seqs=8)
    preempted = []
    preempt = small.engine.scheduler._preempt
    monkeypatch.setattr(small.engine.scheduler, "_preempt", lambda seq: (
        preempted.append((seq.matcher is not None, len(seq.output_token_ids))), preempt(seq)))
    prompts = [f"Story {i}:" for i in range(3)] + [f"Person {i} as JSON:" for i in range(3)]
    constrained = _greedy(max_tokens=100, structured_outputs={"json": SHORT_PERSON})
    params = [_greedy(max_tokens=48, ignore_eos=True)] * 3 + [constrained] * 3
    outs = small.generate(prompts, params, use_tqdm=False)
    assert any(has_grammar and num_out > 0 for has_grammar, num_out in preempted), preempted
    plain = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    for o in outs[3:]:
        assert o.outputs[0].finish_reason == "stop" and set(json.loads(o.outputs[0].text)) == {"name", "age", "tags"}


def test_a_constraint_slower_to_compile_than_the_bound_fails_the_request(llm, monkeypatch):
    tiny = dataclasses.replace(llm.engine.config, limits=RequestLimits(max_constraint_compile_s=1e-4))
    monkeypatch.setattr(llm.engine, "config", tiny)
    never_compiled = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(40)}}
    with pytest.raises(ValueError, match=r"structured_outputs: the constraint did not compile within 0.0001 s"):
        llm.generate(["x"], SamplingParams(structured_outputs={"json": never_compiled}), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_the_step_loop_runs_on_while_a_constraint_compiles_and_the_add_waits_for_it(llm, monkeypatch):
    compiler = llm.engine._grammar_compiler()
    release = threading.Event()
    compile_key = compiler._compile_key
    monkeypatch.setattr(compiler, "_compile_key", lambda key: (release.wait(30), compile_key(key))[1])
    slow = {"choice": ["slowly", "compiled"]}

    async def scenario(client: AsyncLLMEngine) -> str:
        add = asyncio.ensure_future(client.add_request("constrained", "Answer:", _greedy(structured_outputs=slow)))
        free = await client.add_request("free", "The capital of France is", _greedy(max_tokens=8, ignore_eos=True))
        outs = [out async for out in free]  # the whole free request runs while the constraint still compiles
        assert outs[-1].finished and not add.done()
        release.set()
        text = ""
        async for out in await add:
            text += out.outputs[0].text
        return text

    client = AsyncLLMEngine(llm.engine)
    client.start()
    try:
        text = asyncio.run(asyncio.wait_for(scenario(client), 60))
    finally:
        client.shutdown(10)
    assert text in ("slowly", "compiled")


def test_a_compile_past_the_bound_is_refused_through_the_engine_core(llm, monkeypatch):
    compiler = llm.engine._grammar_compiler()
    release = threading.Event()
    compile_key = compiler._compile_key
    monkeypatch.setattr(compiler, "_compile_key", lambda key: (release.wait(30), compile_key(key))[1])
    monkeypatch.setattr(llm.engine, "config", dataclasses.replace(
        llm.engine.config, limits=RequestLimits(max_constraint_compile_s=0.2)))
    schema = {"type": "object", "properties": {"stuck": {"type": "integer"}}}

    async def scenario(client: AsyncLLMEngine) -> None:
        with pytest.raises(InvalidRequestError, match="did not compile within 0.2 s"):
            await client.add_request("stuck", "x", _greedy(structured_outputs={"json": schema}))

    client = AsyncLLMEngine(llm.engine)
    client.start()
    try:
        asyncio.run(asyncio.wait_for(scenario(client), 30))
    finally:
        release.set()
        client.shutdown(10)
    assert not llm.engine.has_unfinished_requests()
