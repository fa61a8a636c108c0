"""Beam search against transformers' generate(num_beams=W, do_sample=False): the same W sequences, in the same
order, with the same scores; the server's driver (over the async engine client) gives the offline result."""
import asyncio

import pytest
import torch

from tokenmill import LLM, BeamSearchParams
from tokenmill.engine.core.async_engine import AsyncLLMEngine
from tokenmill.engine.core.beam_search_stream import beam_search
from tokenmill.engine.limits import InvalidRequestError

EOS = 2  # SmolLM2's <|im_end|>
# (beam width, max_tokens, length_penalty, early_stopping, include_stop_str_in_output)
CASES = [(2, 8, 1.0, False, False), (4, 8, 2.0, True, True)]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def prompts(llm):
    """Two chat turns whose answers end (an EOS) within the tokens given, one as text and one as token ids; of
    one length, so that transformers searches both in one batch without padding."""
    tok = llm.get_tokenizer()
    turns = [[{"role": "user", "content": f"What is the capital of {country}?"}] for country in ("France", "Italy")]
    text = tok.apply_chat_template(turns[0], add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(turns[1], add_generation_prompt=True, tokenize=True, return_dict=False)
    return [text, {"prompt_token_ids": list(ids)}]


@pytest.fixture(scope="module")
def results(llm, prompts):
    """Per case: the offline result, and the prefix-cache hits it made."""
    out = {}
    for case in CASES:
        hits = llm.engine.block_manager.prefix_hits
        width, max_tokens, penalty, early, keep_eos = case
        params = BeamSearchParams(width, max_tokens, length_penalty=penalty, early_stopping=early,
                                  include_stop_str_in_output=keep_eos)
        out[case] = llm.beam_search(prompts, params), llm.engine.block_manager.prefix_hits - hits
    return out


def transformers_beams(hf, prompt_ids: list[list[int]], width, max_tokens, penalty,
                       early) -> list[list[tuple[list[int], float]]]:
    """Per prompt (all of one length), (generated ids up to the EOS if any, score) of transformers' width best
    sequences, best first."""
    out = hf.generate(torch.tensor(prompt_ids), num_beams=width, num_return_sequences=width, do_sample=False,
                      max_new_tokens=max_tokens, length_penalty=penalty, early_stopping=early, eos_token_id=EOS,
                      pad_token_id=EOS, return_dict_in_generate=True, output_scores=True)
    beams = []
    for row, score in zip(out.sequences.tolist(), out.sequences_scores.tolist(), strict=True):
        generated = row[len(prompt_ids[0]):]
        beams.append((generated[:generated.index(EOS) + 1] if EOS in generated else generated, score))
    return [beams[i:i + width] for i in range(0, len(beams), width)]


@pytest.mark.parametrize("case", CASES, ids=["w2", "w4-penalty2-early"])
def test_beams_are_transformers_beams(llm, hf_model, prompts, results, case):
    outputs, prefix_hits = results[case]
    width, max_tokens, penalty, early, keep_eos = case
    tok = llm.get_tokenizer()
    assert prefix_hits > 0  # the beams' requests share their prompt's KV blocks
    ids = [tok.encode(prompts[0]), prompts[1]["prompt_token_ids"]]
    for prompt_ids, out, want in zip(ids, outputs, transformers_beams(hf_model, ids, width, max_tokens, penalty, early),
                                     strict=True):
        seqs = out.sequences
        assert len(seqs) == width and len({tuple(s.tokens) for s in seqs}) == width
        got = [s.tokens[len(prompt_ids):] + ([EOS] if s.finish_reason == "stop" and not keep_eos else [])
               for s in seqs]
        assert got == [tokens for tokens, _ in want]
        assert [s.score for s in seqs] == pytest.approx([score for _, score in want], abs=1e-3)
        for s, generated in zip(seqs, got, strict=True):
            assert s.finish_reason == ("stop" if generated[-1] == EOS else "length")
            assert s.text == tok.decode(generated[:-1] if s.finish_reason == "stop" else generated,
                                        skip_special_tokens=True)
            assert s.cum_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(s.logprobs, generated, strict=True)))
            assert s.score == pytest.approx(s.cum_logprob / len(generated) ** penalty)
    assert any(s.finish_reason == "stop" for out in outputs for s in out.sequences)


def test_bad_params_are_refused_naming_the_field(llm):
    for kwargs, field in [(dict(beam_width=0), "beam_width"), (dict(temperature=0.5), "temperature"),
                          (dict(length_penalty=float("nan")), "length_penalty"),
                          (dict(early_stopping="sometimes"), "early_stopping"), (dict(max_tokens=0), "max_tokens")]:
        with pytest.raises(ValueError, match=f"^{field} "):
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})
    with pytest.raises(InvalidRequestError, match="beam_width: 11 beams given, the limit is 10"):
        llm.beam_search("Hi", BeamSearchParams(11, 4))
    with pytest.raises(InvalidRequestError, match="context"):
        llm.beam_search("Hi", BeamSearchParams(2, llm.engine.max_model_len))


def test_the_async_driver_gives_the_offline_result(llm, prompts, results):
    case = CASES[1]
    params = BeamSearchParams(case[0], case[1], length_penalty=case[2], early_stopping=case[3],
                              include_stop_str_in_output=case[4])

    async def main():
        client = AsyncLLMEngine(llm.engine)
        client.start()
        try:
            with pytest.raises(InvalidRequestError, match="n: 11 beams given, the limit is 10") as e:
                await beam_search(client, "too-wide", prompts[0], BeamSearchParams(11, 4))
            assert e.value.param == "n"
            streams = [await beam_search(client, f"b{i}", p, params) for i, p in enumerate(prompts)]
            results = []
            for stream in streams:
                results += [out async for out in stream]
            return results
        finally:
            client.shutdown(5)

    served = asyncio.run(asyncio.wait_for(main(), 120))
    for out, want in zip(served, results[case][0], strict=True):
        assert out.finished and [o.index for o in out.outputs] == list(range(case[0]))
        assert [o.token_ids for o in out.outputs] == [s.tokens[len(out.prompt_token_ids):] for s in want.sequences]
        assert [o.text for o in out.outputs] == [s.text for s in want.sequences]
        assert [o.finish_reason for o in out.outputs] == [s.finish_reason for s in want.sequences]
