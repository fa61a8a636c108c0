"""The OpenAI Agents SDK on its default model, OpenAIResponsesModel, against a real server: an agent calls
its function tool with arguments that fit the tool's schema, and its final output is the tool's result.
tool_choice "required" forces the call by grammar and stop_on_first_tool ends the run there, so the
tiny model's run is deterministic."""
import asyncio
from typing import Annotated

import openai
import pytest
from pydantic import Field

agents = pytest.importorskip("agents")


def _weather_agent(server, model_name) -> tuple[agents.Agent, list[str]]:
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: Annotated[str, Field(max_length=30)]) -> str:
        """The current weather in a city."""
        cities.append(city)
        return f"Sunny in {city}"

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    agent = agents.Agent(name="forecaster", instructions="Answer with the weather tool.", tools=[get_weather],
                         model=agents.OpenAIResponsesModel(model_name, client),
                         model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
                         tool_use_behavior="stop_on_first_tool")
    return agent, cities


@pytest.fixture(autouse=True)
def no_tracing():
    agents.set_tracing_disabled(True)


def test_an_agent_calls_its_tool_and_answers_with_its_result(server, model_name):
    agent, cities = _weather_agent(server, model_name)
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?"))
    assert len(cities) == 1 and 0 < len(cities[0]) <= 30
    assert result.final_output == f"Sunny in {cities[0]}"
    [response] = result.raw_responses
    assert [item.type for item in response.output] == ["function_call"]
    assert response.output[0].name == "get_weather" and response.usage.output_tokens > 0


def test_a_streamed_agent_run_makes_the_same_call(server, model_name):
    agent, cities = _weather_agent(server, model_name)

    async def both() -> tuple[object, object, list[str]]:  # one event loop: the client belongs to it
        whole = await agents.Runner.run(agent, "What is the weather in Paris?")
        run = agents.Runner.run_streamed(agent, "What is the weather in Paris?")
        kinds = [event.data.type async for event in run.stream_events() if event.type == "raw_response_event"]
        return whole, run, kinds

    whole, run, kinds = asyncio.run(both())
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    assert cities[0] == cities[1] and run.final_output == whole.final_output
