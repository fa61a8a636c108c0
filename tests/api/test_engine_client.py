"""The async engine client over a scripted engine: a dead engine fails every pending and new request
loudly, the queue bound counts sequences and frees them when requests end, and limits are checked
before the engine sees anything."""
import asyncio

import pytest
from api_helpers import ScriptedEngine

from tokenmill.engine.core.async_engine import AsyncLLMEngine
from tokenmill.engine.core.engine_client import EngineDeadError, EngineOverloadedError, RequestFailedError
from tokenmill.engine.limits import InvalidRequestError
from tokenmill.engine.sampling.sampling_params import SamplingParams


def run(engine: ScriptedEngine, scenario):
    async def main():
        client = AsyncLLMEngine(engine)
        client.start()
        try:
            return await scenario(client)
        finally:
            client.shutdown(5)
    return asyncio.run(asyncio.wait_for(main(), 30))


def test_a_failing_step_kills_the_engine_loudly():
    engine = ScriptedEngine()
    dead_calls = []

    async def scenario(client):
        client.on_dead(dead_calls.append)
        stream = await client.add_request("a", [1, 2], SamplingParams(max_tokens=60))
        seen = []
        with pytest.raises(EngineDeadError, match="device lost"):
            async for out in stream:
                seen.append(out)
                engine.fail_step.set()
        assert not client.is_running and client.dead_error is not None
        with pytest.raises(EngineDeadError):
            await client.add_request("b", [1, 2], SamplingParams(max_tokens=3))
        return seen

    seen = run(engine, scenario)
    assert seen[0].outputs[0].token_ids == [7]
    assert len(dead_calls) == 1 and isinstance(dead_calls[0], EngineDeadError)


def test_a_failing_abort_kills_the_engine_instead_of_hanging_its_clients():
    engine = ScriptedEngine()

    async def scenario(client):
        streams = [await client.add_request(rid, [1], SamplingParams(max_tokens=60)) for rid in "ab"]
        engine.fail_abort.set()
        client.abort("a")
        with pytest.raises(EngineDeadError, match="block freed twice"):
            async for _ in streams[1]:
                pass

    run(engine, scenario)


def test_queue_bound_counts_sequences_and_frees_them_when_requests_end():
    engine = ScriptedEngine(max_num_seqs=4, max_waiting_seqs=2)  # room for 6 sequences

    async def scenario(client):
        first = await client.add_request("a", [1], SamplingParams(n=4, max_tokens=3))
        with pytest.raises(EngineOverloadedError) as e:
            await client.add_request("b", [1], SamplingParams(n=3, max_tokens=3))
        assert e.value.retry_after >= 1
        second = await client.add_request("c", [1], SamplingParams(n=2, max_tokens=3))
        async for _ in first:
            pass
        async for _ in second:
            pass
        # both ended: the whole room is free again
        third = await client.add_request("d", [1], SamplingParams(n=6, max_tokens=1))
        async for _ in third:
            pass

    run(engine, scenario)
    assert engine.added == ["a", "c", "d"]  # the refused request never reached the engine


@pytest.mark.parametrize("params, field", [
    (dict(n=129), "n"), (dict(stop=["x"] * 17), "stop"), (dict(stop=["x" * 257]), "stop"),
    (dict(stop_token_ids=list(range(257))), "stop_token_ids"),
    (dict(logit_bias={i: 1.0 for i in range(1025)}), "logit_bias"), (dict(max_tokens=64), "prompt")])
def test_limits_are_checked_before_the_engine_sees_the_request(params, field):
    engine = ScriptedEngine()

    async def scenario(client):
        with pytest.raises(InvalidRequestError) as e:
            await client.add_request("a", [1, 2], SamplingParams(**params))
        return e.value

    error = run(engine, scenario)
    assert error.param == field and ("limit" in str(error) or "context" in str(error))
    assert engine.added == []


def test_a_caller_that_gives_up_while_its_add_is_pending_does_not_harm_the_engine():
    engine = ScriptedEngine()
    engine.step_s = 0.3  # the engine thread is busy in a step when the add arrives

    async def scenario(client):
        first = await client.add_request("a", [1], SamplingParams(max_tokens=3))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.add_request("b", [1], SamplingParams(max_tokens=3)), 0.05)
        async for _ in first:
            pass
        assert client.dead_error is None and client.is_running
        again = await client.add_request("c", [1], SamplingParams(max_tokens=1))
        async for _ in again:
            pass
        return client._num_seqs

    assert run(engine, scenario) == 0  # every sequence's room came back
    assert "b" not in engine.requests


def test_an_abort_ends_a_stream_that_someone_is_reading():
    engine = ScriptedEngine()

    async def scenario(client):
        stream = await client.add_request("a", [1], SamplingParams(max_tokens=60))

        async def read():
            async for _ in stream:
                pass

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0.05)
        client.abort("a")
        with pytest.raises(RequestFailedError, match="aborted"):
            await asyncio.wait_for(reader, 5)

    run(engine, scenario)


def test_a_request_id_in_use_is_refused_without_touching_the_first_request():
    engine = ScriptedEngine()

    async def scenario(client):
        first = await client.add_request("a", [1], SamplingParams(max_tokens=5))
        with pytest.raises(InvalidRequestError, match="already in use"):
            await client.add_request("a", [1], SamplingParams(max_tokens=5))
        outs = [out async for out in first]
        return outs[-1].finished, client._num_seqs

    assert run(engine, scenario) == (True, 0)
