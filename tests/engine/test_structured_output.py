"""Structured outputs in the engine: constrained rows follow their grammar, free rows in the same batch are
untouched, and a bad constraint is a ValueError before the request takes anything."""
import json

import pytest

from engine import LLM, SamplingParams
from engine.structured_output import StructuredOutputsParams

pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


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
    ({"grammar": 'root ::= "(" [a-z]+ ")"'}, lambda s: s[0] == "(" and s[-1] == ")" and s[1:-1].isalpha()),
])
def test_each_kind_of_constraint_holds(llm, constraint, check):
    out = llm.generate(["Answer: "], _greedy(max_tokens=100, structured_outputs=constraint), use_tqdm=False)
    assert check(out[0].outputs[0].text), out[0].outputs[0].text


def test_sampled_constrained_outputs_all_parse(llm):
    # Sampling can run a free string on for ever; the schema's own bounds keep it short.
    short = json.loads(json.dumps(PERSON))
    short["properties"]["name"]["maxLength"] = 12
    short["properties"]["tags"].update(maxItems=2, items={"type": "string", "maxLength": 8})
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=300, structured_outputs={"json": short})
    for o in llm.generate(["A person:"], params, use_tqdm=False)[0].outputs:
        assert o.finish_reason == "stop"
        person = json.loads(o.text)
        assert set(person) == {"name", "age", "tags"} and len(person["name"]) <= 12 and len(person["tags"]) <= 2


@pytest.mark.parametrize("bad,message", [
    ({"json": {"type": "nonsense"}}, "structured_outputs.json: Unsupported type"),
    ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
    ({"regex": "(("}, "structured_outputs.regex: Regex parsing error"),
    ({"grammar": "root ::= "}, "structured_outputs.grammar: EBNF parser error"),
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
