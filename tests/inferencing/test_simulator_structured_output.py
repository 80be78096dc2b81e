"""Structured output of the simulator: replies that validate against the requested schema."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from enum import Enum
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema
from pydantic import BaseModel

from inferencing.simulator import ScriptedReply, SimulatorServer
from inferencing.simulator.structured import minimal_instance

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Summarise the leave policy."}
]

LEAVE_POLICY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 12, "maxLength": 40},
        "days": {"type": "integer", "minimum": 20, "maximum": 30},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "kind": {"enum": ["annual", "sick", "parental"]},
        "version": {"const": 2},
        "paid": {"type": "boolean"},
        "countries": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "owner": {"$ref": "#/$defs/person"},
        "deputy": {"anyOf": [{"$ref": "#/$defs/person"}, {"type": "null"}]},
        "updated": {"type": "string", "format": "date"},
        "note": {"type": ["string", "null"]},
        "optional": {"type": "string"},
    },
    "required": [
        "title",
        "days",
        "ratio",
        "kind",
        "version",
        "paid",
        "countries",
        "owner",
        "deputy",
        "updated",
        "note",
    ],
    "additionalProperties": False,
    "$defs": {
        "person": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "reports": {"type": "array", "items": {"$ref": "#/$defs/person"}},
                "level": {"type": "integer", "multipleOf": 5, "minimum": 12},
            },
            "required": ["name", "reports", "level"],
            "additionalProperties": False,
        }
    },
}


def json_schema_format(schema: dict[str, Any]) -> ResponseFormatJSONSchema:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.fixture
async def client(simulator: SimulatorServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=simulator.openai_base_url, api_key="k", max_retries=0, timeout=10
    ) as client:
        yield client


async def test_a_json_schema_reply_validates_against_the_schema(
    client: openai.AsyncOpenAI,
) -> None:
    answer = await client.chat.completions.create(
        model="m", messages=QUESTION, response_format=json_schema_format(LEAVE_POLICY_SCHEMA)
    )
    content = answer.choices[0].message.content
    assert content is not None
    document = json.loads(content)

    jsonschema.Draft202012Validator(LEAVE_POLICY_SCHEMA).validate(document)
    assert "optional" not in document
    assert (document["days"], document["kind"], document["owner"]["level"]) == (20, "annual", 15)


async def test_a_streamed_json_schema_reply_joins_into_a_valid_document(
    client: openai.AsyncOpenAI,
) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=QUESTION,
        response_format=json_schema_format(LEAVE_POLICY_SCHEMA),
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1
    jsonschema.validate(json.loads("".join(pieces)), LEAVE_POLICY_SCHEMA)


class LeaveKind(Enum):
    ANNUAL = "annual"
    SICK = "sick"


class Approver(BaseModel):
    name: str
    email: str | None


class LeaveAnswer(BaseModel):
    days: int
    kind: LeaveKind
    approvers: list[Approver]
    primary: Approver
    paid: bool


async def test_the_sdk_parses_the_reply_into_a_pydantic_model(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.parse(
        model="m", messages=QUESTION, response_format=LeaveAnswer
    )
    parsed = completion.choices[0].message.parsed
    assert parsed == LeaveAnswer(
        days=0,
        kind=LeaveKind.ANNUAL,
        approvers=[],
        primary=Approver(name="simulated", email="simulated"),
        paid=False,
    )


async def test_a_json_object_reply_is_a_json_object(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(
        model="m", messages=QUESTION, response_format={"type": "json_object"}
    )
    assert json.loads(answer.choices[0].message.content or "") == {}


async def test_scripted_replies_win_over_the_response_format(
    simulator: SimulatorServer, client: openai.AsyncOpenAI
) -> None:
    simulator.script(ScriptedReply(content='{"scripted": true}'))
    answer = await client.chat.completions.create(
        model="m", messages=QUESTION, response_format=json_schema_format(LEAVE_POLICY_SCHEMA)
    )
    assert answer.choices[0].message.content == '{"scripted": true}'


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"type": "string", "format": "date-time"},
        {"type": "string", "maxLength": 3},
        {"type": "integer", "exclusiveMinimum": 4},
        {"type": "integer", "maximum": -3},
        {"type": "number", "minimum": 0.5, "exclusiveMaximum": 0.75},
        {"type": "number", "exclusiveMaximum": -1},
        {"type": "number", "minimum": 1, "multipleOf": 0.25},
        {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}], "minItems": 3},
        {"type": ["null", "integer"]},
        {"type": "null"},
        {"allOf": [{"required": ["a"]}, {"required": ["b"], "properties": {"b": {"enum": [7]}}}]},
        {"oneOf": [{"type": "boolean"}, {"type": "string"}]},
        {"properties": {"a": {"minimum": 3}}, "required": ["a"]},
        {"type": "object", "required": ["x"], "additionalProperties": {"type": "integer"}},
        {
            "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
            "$ref": "#/$defs/node",
        },
    ],
)
def test_minimal_instances_validate(schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(schema).validate(minimal_instance(schema))


def test_a_recursive_schema_ends_at_its_null_branch() -> None:
    schema = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                "required": ["next"],
            }
        },
        "$ref": "#/$defs/node",
    }
    instance = minimal_instance(schema)
    jsonschema.validate(instance, schema)
    depth = 0
    while instance is not None:
        instance, depth = instance["next"], depth + 1
    assert 1 < depth < 40
