"""Answers agent frameworks can use: a tool call on a documented cue, tool results echoed back, thinking,
and canned responses, through the official SDK (sync and async, real time and batches)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx2
import pytest

from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.emulator.testing import async_wait_for_batch, wait_for_batch
from tests.emulator_helpers import req

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"},
            "hourly": {"type": "boolean", "default": True},
        },
        "required": ["city", "unit", "days", "hourly"],
    },
}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
MODEL = "claude-haiku-4-5"


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(processing_seconds=0.02)) as emulator:
        yield emulator


@pytest.fixture
def client(emu: EmulatorThread) -> Iterator[anthropic.Anthropic]:
    emu.reset()
    with anthropic.Anthropic(base_url=emu.base_url, api_key="test-key", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def aclient(emu: EmulatorThread) -> AsyncIterator[anthropic.AsyncAnthropic]:
    emu.reset()
    async with anthropic.AsyncAnthropic(base_url=emu.base_url, api_key="test-key", max_retries=0) as sdk:
        yield sdk


def ask(client: anthropic.Anthropic, text: str, **params: Any) -> anthropic.types.Message:
    return client.messages.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": text}], **params
    )


# --- the tool cue ---------------------------------------------------------------------------------------


def test_a_cue_answers_with_a_tool_use_and_the_results_come_back_echoed(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [
        {"role": "user", "content": 'Weather please. [[tool:get_weather {"city": "Paris", "days": 2}]]'}
    ]
    first = client.messages.create(model=MODEL, max_tokens=64, tools=[WEATHER], messages=messages)
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert call.type == "tool_use"
    assert call.name == "get_weather" and call.input == {"city": "Paris", "days": 2}
    assert call.id.startswith("toolu_") and len(call.id) == len("toolu_") + 24
    assert first.usage.output_tokens > 0

    # The SDK serialises its own content blocks when they are sent back: the loop of every agent.
    messages += [
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, dry"}],
        },
    ]
    second = client.messages.create(model=MODEL, max_tokens=64, tools=[WEATHER], messages=messages)
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"
    assert second.content[0].text == f"echo: tool_result {call.id}: 18 C, dry"


def test_several_cues_are_parallel_calls_and_unknown_tools_are_ignored(client: anthropic.Anthropic) -> None:
    text = '[[tool:get_time]] then [[tool:get_weather {"city": "Oslo"}]] and [[tool:launch_rocket]]'
    message = ask(client, text, tools=[WEATHER, CLOCK])
    assert [(b.name, b.input) for b in message.content if b.type == "tool_use"] == [
        ("get_time", {}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert len({b.id for b in message.content if b.type == "tool_use"}) == 2

    one = ask(
        client, text, tools=[WEATHER, CLOCK], tool_choice={"type": "auto", "disable_parallel_tool_use": True}
    )
    assert [b.name for b in one.content if b.type == "tool_use"] == ["get_time"]


def test_without_tools_or_with_tool_choice_none_a_cue_is_just_text(client: anthropic.Anthropic) -> None:
    text = "[[tool:get_weather]]"
    assert ask(client, text).content[0].text == f"echo: {text}"
    none = ask(client, text, tools=[WEATHER], tool_choice={"type": "none"})
    assert none.stop_reason == "end_turn" and none.content[0].text == f"echo: {text}"
    # Tools without a cue: the plain echo many tests rely on.
    assert ask(client, "hello", tools=[WEATHER]).content[0].text == "echo: hello"


def test_a_forced_tool_without_a_cue_gets_an_input_built_from_its_schema(client: anthropic.Anthropic) -> None:
    forced = ask(client, "hi", tools=[CLOCK, WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    assert forced.stop_reason == "tool_use"
    [call] = forced.content
    assert call.name == "get_weather"
    assert call.input == {"city": "placeholder", "unit": "celsius", "days": 0, "hourly": True}

    any_tool = ask(client, "hi", tools=[CLOCK, WEATHER], tool_choice={"type": "any"})
    assert [(b.name, b.input) for b in any_tool.content] == [("get_time", {})]

    cued = ask(
        client,
        '[[tool:get_weather {"city": "Rome"}]]',
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert cued.content[0].input == {"city": "Rome"}


def test_the_tool_loop_works_in_batches_too(client: anthropic.Anthropic) -> None:
    turn = [{"role": "user", "content": '[[tool:get_weather {"city": "Lima"}]]'}]
    first = client.messages.batches.create(requests=[req("t1", tools=[WEATHER], messages=turn)])
    wait_for_batch(client, first.id)
    [line] = client.messages.batches.results(first.id)
    message = line.result.message
    assert message.stop_reason == "tool_use"
    call = message.content[0]
    assert call.type == "tool_use" and call.input == {"city": "Lima"}

    second_turn = [
        *turn,
        {"role": "assistant", "content": [call.model_dump()]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": [{"type": "text", "text": "warm"}],
                },
                {"type": "text", "text": "thanks"},
            ],
        },
    ]
    second = client.messages.batches.create(requests=[req("t2", tools=[WEATHER], messages=second_turn)])
    wait_for_batch(client, second.id)
    [line] = client.messages.batches.results(second.id)
    assert line.result.message.content[0].text == f"echo: tool_result {call.id}: warm\nthanks"


async def test_the_async_sdk_gets_the_same_tool_calls(aclient: anthropic.AsyncAnthropic) -> None:
    message = await aclient.messages.create(
        model=MODEL,
        max_tokens=64,
        tools=[WEATHER],
        messages=[{"role": "user", "content": '[[tool:get_weather {"city": "Kyiv"}]]'}],
    )
    assert message.stop_reason == "tool_use" and message.content[0].input == {"city": "Kyiv"}

    batch = await aclient.messages.batches.create(
        requests=[req("a", "[[tool:get_time]]", tools=[CLOCK]), req("b", "plain")]
    )
    await async_wait_for_batch(aclient, batch.id)
    results = {r.custom_id: r.result async for r in await aclient.messages.batches.results(batch.id)}
    assert results["a"].message.content[0].name == "get_time"
    assert results["b"].message.content[0].text == "echo: plain"


# --- thinking -------------------------------------------------------------------------------------------


def test_enabled_thinking_puts_a_signed_thinking_block_first(client: anthropic.Anthropic) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = client.messages.create(
        model=MODEL, max_tokens=2048, thinking=thinking, messages=[{"role": "user", "content": "why?"}]
    )
    first, text = message.content
    assert first.type == "thinking" and first.thinking and first.signature
    assert text.type == "text" and text.text == "echo: why?"
    plain = ask(client, "why?")
    assert message.usage.output_tokens > plain.usage.output_tokens

    with_tool = client.messages.create(
        model=MODEL,
        max_tokens=2048,
        thinking=thinking,
        tools=[CLOCK],
        messages=[{"role": "user", "content": "[[tool:get_time]]"}],
    )
    assert [b.type for b in with_tool.content] == ["thinking", "tool_use"]
    assert with_tool.stop_reason == "tool_use"


# --- canned responses -----------------------------------------------------------------------------------


def test_canned_responses_answer_what_they_match(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    with httpx2.Client(base_url=emu.base_url) as http:
        stored = http.post(
            "/_emulator/responses",
            json=[
                {"match": "capital of France", "content": [{"type": "text", "text": "Paris."}]},
                {
                    "match": "book a flight",
                    "content": [
                        {"type": "tool_use", "id": "toolu_fixed", "name": "book", "input": {"to": "LIS"}}
                    ],
                },
            ],
        )
        assert stored.status_code == 200
        assert stored.json()[1]["stop_reason"] == "tool_use"
        assert http.get("/_emulator/responses").json() == stored.json()
        bad = http.post("/_emulator/responses", json=[{"match": "", "content": []}])
        assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("responses.0.match:")

    assert ask(client, "What is the capital of France?").content[0].text == "Paris."
    booked = ask(client, "please book a flight")
    assert booked.stop_reason == "tool_use" and booked.content[0].input == {"to": "LIS"}
    assert ask(client, "anything else").content[0].text == "echo: anything else"

    batch = client.messages.batches.create(requests=[req("c", "capital of France?")])
    wait_for_batch(client, batch.id)
    [line] = client.messages.batches.results(batch.id)
    assert line.result.message.content[0].text == "Paris."

    emu.reset()  # canned responses are test data: a reset clears them
    assert ask(client, "capital of France").content[0].text == "echo: capital of France"
    emu.set_responses([{"match": "x", "content": [{"type": "text", "text": "y"}]}])
    assert ask(client, "x").content[0].text == "y"
