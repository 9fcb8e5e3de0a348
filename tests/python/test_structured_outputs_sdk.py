"""Drives the `mock` provider's structured outputs and forced tool calls with the official
`openai` Python package, unmodified.

Run by `tests/tests/structured_outputs.rs` with:
  APEX_HUB_URL   the hub's base URL including /v1
  APEX_API_KEY   an API key of the hub
  APEX_MODEL     the built-in mock

`chat.completions.parse` (or `beta.chat.completions.parse` in older SDKs) sends a pydantic
model as `response_format: json_schema` (strict) and parses the answer into it; the values
are those of the hub's `llm::mock_schema` rules. Prints "<case> ok" per passing case and the
parsed plan as one JSON line (`{"plan": ...}`); exits non-zero on the first failure.
"""

import datetime
import json
import os
import sys
from typing import List, Literal, Optional

import openai
import pydantic

URL = os.environ["APEX_HUB_URL"]
KEY = os.environ["APEX_API_KEY"]
MODEL = os.environ["APEX_MODEL"]
WORDS = "This is a mock answer from apex."

client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=60)
completions = client.chat.completions
if not hasattr(completions, "parse"):
    completions = client.beta.chat.completions


class Step(pydantic.BaseModel):
    id: int = pydantic.Field(ge=1)
    description: str
    priority: Literal["high", "medium", "low"]
    sources: List[str]
    estimate_hours: Optional[float]


class Plan(pydantic.BaseModel):
    goal: str
    steps: List[Step]
    due: datetime.datetime


class Lookup(pydantic.BaseModel):
    """Looks a word up."""

    word: str
    limit: int = pydantic.Field(ge=5, le=50)
    exact: bool


MESSAGES = [{"role": "user", "content": "plan a trip to Lisbon"}]


def check_plan(plan):
    assert isinstance(plan, Plan), type(plan)
    assert plan.goal == f"goal: {WORDS}", plan.goal
    assert len(plan.steps) == 3, plan.steps
    for i, step in enumerate(plan.steps):
        assert step.id == 1, step
        assert step.description == f"description {i}: {WORDS}", step.description
        assert step.priority == "high", step
        assert step.sources == [f"item {j}: {WORDS}" for j in range(3)], step.sources
        assert step.estimate_hours == 0.5, step
    assert plan.due == datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc), plan.due


def parse():
    r = completions.parse(model=MODEL, messages=MESSAGES, response_format=Plan)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    assert choice.message.refusal is None, choice.message
    check_plan(choice.message.parsed)
    words = len(choice.message.content.split())
    assert r.usage.completion_tokens == words, (r.usage, words)
    print(json.dumps({"plan": json.loads(choice.message.content)}), flush=True)


def stream():
    with completions.stream(model=MODEL, messages=MESSAGES, response_format=Plan) as s:
        chunks = 0
        for event in s:
            if event.type == "content.delta":
                chunks += 1
        final = s.get_final_completion()
    assert chunks > 1, chunks
    check_plan(final.choices[0].message.parsed)


def json_object():
    r = completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "answer in JSON"}],
        response_format={"type": "json_object"},
    )
    v = json.loads(r.choices[0].message.content)
    assert isinstance(v, dict) and v["answer"].startswith("This is a mock answer"), v


def forced_tool():
    tools = [openai.pydantic_function_tool(Lookup)]
    r = completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "look something up"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "Lookup"}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "Lookup", calls
    args = calls[0].function.parsed_arguments
    assert args == Lookup(word=f"word: {WORDS}", limit=5, exact=True), args
    # `required` on a plain create: the first tool, its arguments valid JSON of its schema.
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "anything"}],
        tools=[
            {
                "type": "function",
                "function": {"name": "lookup", "parameters": Lookup.model_json_schema()},
            },
            {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
        ],
        tool_choice="required",
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup", call
    Lookup.model_validate(json.loads(call.function.arguments))
    # `none`: no call, even when the prompt names the tool.
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "lookup: hello"}],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": Lookup.model_json_schema()}}],
        tool_choice="none",
    )
    assert not r.choices[0].message.tool_calls, r
    assert r.choices[0].finish_reason == "stop", r


for name, case in [
    ("parse", parse),
    ("stream", stream),
    ("json_object", json_object),
    ("forced_tool", forced_tool),
]:
    case()
    print(f"{name} ok", flush=True)
sys.exit(0)
