"""Property-based: requests generated from ``/openapi.json`` (valid, mutated and garbage) never get a 5xx.

Hypothesis draws an operation from the API's own OpenAPI document, then its path and query parameters, headers
and body from the document's schemas — and mutates them (a field dropped, one added, a value of the wrong type,
a wrong key). Whatever comes back must be below 500, and every 4xx must be the API's JSON error naming its type.
The server keeps its state between examples, so later requests meet jobs, runs and keys made by earlier ones.
"""

from __future__ import annotations

import json
import string
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import pytest
from api_env import ApiEnv, api_env, chat, claude
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.providers.limits import OPENAI_ENDPOINTS

JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
#: what a client can put in a header value (no control characters)
HEADER_CHARS = "".join(chr(c) for c in range(0x20, 0x7F))
PATH_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-_.~:@!$&'()*+,;= é", min_size=1, max_size=40)
CALLBACKS = st.sampled_from(
    ["http://127.0.0.1:9/hook", "https://hooks.example.com/x", "ftp://x/y", "http://", "not a url", ""]
)


def _job_bodies() -> st.SearchStrategy[Any]:
    realistic = st.sampled_from([chat(1)["body"], claude(1)["body"], {"model": "m", "input": "x"}])
    return st.one_of(realistic, st.dictionaries(st.text(max_size=10), JSON, max_size=4), JSON)


_SPECIAL: dict[str, st.SearchStrategy[Any]] = {
    "url": st.sampled_from([*sorted(OPENAI_ENDPOINTS), "/v1/messages", "/v1/nope", None]),
    "body": _job_bodies(),
    "callback_url": CALLBACKS,
    "provider": st.sampled_from(["openai", "anthropic", "gemini", None, 1]),
}


def from_schema(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that fit a JSON schema (the subset pydantic emits), mostly."""
    if depth > 4:
        return JSON_LEAF
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth + 1)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs, depth + 1) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "string":
        if schema.get("format") == "date-time":
            return st.datetimes(timezones=st.none() | st.just(UTC)).map(lambda d: d.isoformat())
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs, depth + 1), max_size=3)
    if kind == "object":
        props: dict[str, Any] = schema.get("properties", {})
        if not props:
            extra = schema.get("additionalProperties")
            values = from_schema(extra, defs, depth + 1) if isinstance(extra, dict) else JSON
            return st.dictionaries(st.text(max_size=10), values, max_size=3)
        required = set(schema.get("required", []))

        def field(name: str, sub: dict[str, Any]) -> st.SearchStrategy[Any]:
            return _SPECIAL.get(name, from_schema(sub, defs, depth + 1))

        return st.fixed_dictionaries(
            {k: field(k, v) for k, v in props.items() if k in required},
            optional={k: field(k, v) for k, v in props.items() if k not in required},
        )
    return JSON


@st.composite
def valid_jobs(draw: st.DrawFn) -> dict[str, Any]:
    """Jobs the API accepts (some of them repeats, some with a callback or a deadline)."""
    make = draw(st.sampled_from([chat, claude]))
    extra: dict[str, Any] = {}
    if draw(st.booleans()):
        extra["run"] = draw(st.sampled_from(["default", "nightly", "r é"]))
    if draw(st.booleans()):
        extra["custom_id"] = draw(st.sampled_from(["a", "b", "c-1"]))
    if draw(st.booleans()):
        extra["tags"] = draw(st.dictionaries(st.sampled_from(["team", "env"]), st.text(max_size=5), max_size=2))
    if draw(st.booleans()):
        extra["priority"] = draw(st.integers(-5, 5))
    if draw(st.booleans()):
        extra["callback_url"] = "http://127.0.0.1:9/hook"
    if draw(st.booleans()):
        extra["not_after"] = draw(st.datetimes(timezones=st.just(UTC))).isoformat()
    job: dict[str, Any] = make(draw(st.integers(0, 20)), **extra)
    return job


#: requests that pass validation, so generated runs also reach intake, limits, idempotency and the reads after
VALID: dict[str, st.SearchStrategy[Any]] = {
    "JobIn": valid_jobs(),
    "RunCallbackIn": st.fixed_dictionaries({"url": CALLBACKS}),
}


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any]) -> Any:
    """A value from ``base``, sometimes with a field dropped, an unknown one added, or one of the wrong type."""
    value = draw(base)
    if not isinstance(value, dict) or not draw(st.booleans()):
        return value
    value = dict(value)
    action = draw(st.sampled_from(["drop", "add", "retype"]))
    if action == "drop" and value:
        value.pop(draw(st.sampled_from(sorted(value))))
    elif action == "add":
        value[draw(st.text(min_size=1, max_size=10))] = draw(JSON)
    elif value:
        value[draw(st.sampled_from(sorted(value)))] = draw(JSON)
    return value


def _dumps(value: Any) -> bytes:
    """JSON as any client might send it (integers of any size included)."""
    return json.dumps(value).encode()


class KnownId(int):
    """Stands for the n-th job id made so far (modulo how many there are)."""


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, ops in doc["paths"].items() for method, op in ops.items()]


@st.composite
def requests(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """One request to one of the document's operations (path parameters filled in when it is sent)."""
    defs = doc["components"]["schemas"]
    method, path, op = draw(st.sampled_from(_operations(doc)))
    params: dict[str, str] = {}
    headers: dict[str, str] = {}
    path_params: dict[str, Any] = {}
    for p in op.get("parameters", []):
        if p["in"] == "path":
            # a job made earlier (picked when sent: the list grows as the test runs), or any text
            value = draw(
                st.one_of(st.integers(0, 10**6).map(KnownId), PATH_TEXT, st.sampled_from(["default", "nightly"]))
            )
            path_params[p["name"]] = value
        elif p["in"] == "query" and draw(st.booleans()):
            params[p["name"]] = str(draw(st.one_of(from_schema(p["schema"], defs), PATH_TEXT)))
        elif p["in"] == "header" and draw(st.booleans()):
            headers[p["name"]] = draw(st.text(alphabet=HEADER_CHARS, max_size=300).map(lambda s: s.strip()))
    if draw(st.integers(0, 9)) == 0:
        params[draw(st.text(string.ascii_letters, min_size=1, max_size=8))] = "x"
    body: bytes | None = None
    request_body = op.get("requestBody")
    if request_body is not None:
        content = request_body["content"]
        schema = content.get("application/json", {}).get("schema", {})
        if schema.get("type") == "array":
            items = st.one_of(VALID["JobIn"], mutated(from_schema(schema["items"], defs)))
            jobs = draw(st.lists(items, min_size=0, max_size=4))
            body = _dumps(jobs) if draw(st.booleans()) else b"\n".join(_dumps(j) for j in jobs)
        else:
            name = schema.get("$ref", "").rsplit("/", 1)[-1]
            valid = VALID.get(name, st.nothing())
            body = _dumps(draw(st.one_of(valid, mutated(from_schema(schema, defs)))))
        if draw(st.integers(0, 9)) == 0:
            body = draw(st.binary(max_size=200))
    auth = draw(st.sampled_from(["acme"] * 7 + ["globex"] * 3 + ["none", "garbage"]))
    return {
        "method": method,
        "path": path,
        "path_params": path_params,
        "params": params,
        "headers": headers,
        "body": body,
        "auth": auth,
    }


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[ApiEnv]:
    async with api_env(db_url) as e:
        yield e


_DOCS: dict[str, dict[str, Any]] = {}
_IDS: dict[str, list[str]] = {}


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(data=st.data())
async def test_generated_requests_never_get_a_5xx(env: ApiEnv, data: st.DataObject) -> None:
    if env.url not in _DOCS:
        _DOCS[env.url] = (await env.call("GET", "/openapi.json", tenant=None)).json
        _IDS[env.url] = []
    doc, known = _DOCS[env.url], _IDS[env.url]
    request = data.draw(requests(doc))
    auth = request["auth"]
    path = request["path"]
    for name, value in request["path_params"].items():
        if isinstance(value, KnownId):
            value = known[value % len(known)] if known else "0" * 32
        path = path.replace("{" + name + "}", value)
    reply = await env.call(
        request["method"],
        path,
        tenant=auth if auth in ("acme", "globex") else None,
        key="bk_garbage" if auth == "garbage" else None,
        data=request["body"],
        headers=request["headers"],
        params=request["params"],
    )
    assert reply.status < 500, (request, reply.status, reply.body[:500])
    if reply.status >= 400:
        error = reply.error
        assert error["type"] and error["message"], reply.body
        if error["type"] == "invalid_request":
            assert "field" in error
    elif request["path"] == "/v1/jobs" and request["method"] == "POST":
        known.append(reply.json["id"])
