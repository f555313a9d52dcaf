"""Frameworks with one changed line: a pydantic-ai agent on batchd.AsyncAnthropic (a tool call: two turns,
two requests), and LangChain's ChatAnthropic on the HTTP front's base URL. From the ``integrations`` extra;
skipped when it is not installed. Tool answers are canned (tests/front_helpers.tool_message) until the
emulator's tool_use cue lands; plain answers come from the emulator's batches."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

import batchd
from batchd.emulator import EmulatorThread
from batchd.front import FrontConfig
from tests.front_helpers import FrontThread, emulator_backend, tool_backend

TOKEN = "tok-frameworks-0123456789"


async def test_pydantic_ai_agent_makes_a_tool_call() -> None:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.providers.anthropic import AnthropicProvider

    backend = tool_backend()
    client = batchd.AsyncAnthropic(backend=backend)  # the one changed line
    agent = Agent(AnthropicModel("claude-haiku-4-5", provider=AnthropicProvider(anthropic_client=client)))
    cities: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"sunny in {city}"

    result = await agent.run("What is the weather in Paris?")
    assert cities == ["Paris"]
    assert result.output == "Done: sunny in Paris"
    first, second = backend.requests.values()
    assert first.params["tools"][0]["name"] == "get_weather"
    assert second.params["messages"][-1]["content"][0]["type"] == "tool_result"
    assert second.params["messages"][-2]["content"][-1]["type"] == "tool_use"  # pydantic-ai sent it back
    await client.close()


def test_langchain_chat_anthropic_on_the_front(emulator: EmulatorThread) -> None:
    pytest.importorskip("langchain_anthropic")
    from langchain_anthropic import ChatAnthropic
    from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    config = FrontConfig(tokens=(SecretStr(TOKEN),))
    with FrontThread(lambda: emulator_backend(emulator.base_url), config) as front:
        llm = ChatAnthropic(model_name="claude-haiku-4-5", base_url=front.url, api_key=SecretStr(TOKEN))
        assert llm.invoke("hello langchain").content == "echo: hello langchain"

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    with FrontThread(tool_backend, config) as front:
        llm = ChatAnthropic(model_name="claude-haiku-4-5", base_url=front.url, api_key=SecretStr(TOKEN))
        bound = llm.bind_tools([get_weather])
        messages: list[BaseMessage] = [HumanMessage("Weather in Paris?")]
        ai: Any = bound.invoke(messages)
        [call] = ai.tool_calls
        messages += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
        assert bound.invoke(messages).content == "Done: sunny in Paris"
