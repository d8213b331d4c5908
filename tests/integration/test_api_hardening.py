"""The API's HTTP edge under hostile clients, over real sockets on SQLite and PostgreSQL: compressed bodies are
limited by what they inflate to, slow and surplus connections are shed, and a malformed or non-UTF-8
``Authorization`` header never shows its key in an answer or a log line."""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from urllib.parse import urlsplit

import orjson
import pytest
from api_env import ApiEnv, api_env, chat


def _port(env: ApiEnv) -> int:
    port = urlsplit(env.url).port
    assert port is not None
    return port


async def _raw(env: ApiEnv, data: bytes, *, wait_s: float = 5.0, answer_only: bool = False) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``wait_s`` passes); with
    ``answer_only``, until one whole answer (head and ``Content-Length`` bytes) has come."""
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(env))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            if answer_only:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                return head + await reader.readexactly(length)
            received = b""
            while chunk := await reader.read(65536):
                received += chunk
            return received
    finally:
        writer.close()


def _bomb(size: int) -> dict[str, object]:
    job = chat(0)
    job["body"]["messages"][0]["content"] = "a" * size
    return job


async def test_a_compressed_body_is_limited_by_what_it_inflates_to(db_url: str) -> None:
    async with api_env(db_url) as env:
        inflated = orjson.dumps(_bomb(60 << 20))  # 60 MiB of JSON ...
        bomb = gzip.compress(inflated, 9)
        assert len(bomb) < 100_000  # ... in well under 100 KB on the wire
        reply = await env.call("POST", "/v1/jobs", data=bomb, headers={"Content-Encoding": "gzip"})
        assert reply.status == 413, reply.body[:300]
        assert reply.error["type"] == "too_large"
        assert "BATCHER_API_MAX_JOB_BYTES" in reply.error["message"]
        assert await env.count() == 0
        # deflate, and a bulk body, the same
        lines = b"\n".join(orjson.dumps(_bomb(1 << 20)) for _ in range(80))  # 80 MiB
        reply = await env.call(
            "POST", "/v1/jobs/bulk", data=zlib.compress(lines, 9), headers={"Content-Encoding": "deflate"}
        )
        assert reply.status == 413
        assert "BATCHER_API_MAX_BULK_BYTES" in reply.error["message"]
        assert await env.count() == 0
        # the run callback's 64 KiB
        callback = gzip.compress(orjson.dumps({"url": "https://example.com/" + "a" * (1 << 20)}))
        reply = await env.call("PUT", "/v1/runs/nightly/callback", data=callback, headers={"Content-Encoding": "gzip"})
        assert reply.status == 413
        # a body that does not decode as it says is a 400, not a 500
        reply = await env.call("POST", "/v1/jobs", data=b"not gzip at all", headers={"Content-Encoding": "gzip"})
        assert reply.status == 400
        assert reply.error["field"] == "body"
        # a compressed body within the limit is read as usual
        small = gzip.compress(orjson.dumps(chat(1)))
        reply = await env.call("POST", "/v1/jobs", data=small, headers={"Content-Encoding": "gzip"})
        assert reply.status == 202, reply.body
        assert await env.count() == 1


async def test_a_client_that_never_finishes_its_headers_is_disconnected(db_url: str) -> None:
    async with api_env(db_url, api_header_timeout_s=0.5) as env:
        received = await _raw(env, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert received == b""  # closed by the server, before the 5 s this test waits
        # a complete request on the same kind of connection is answered
        answer = await _raw(env, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")


async def test_a_body_that_stops_arriving_gets_408(db_url: str) -> None:
    async with api_env(db_url, api_body_timeout_s=0.5) as env:
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.keys['acme']}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        received = await _raw(env, head + b'{"provider": "openai", ', answer_only=True)
        assert received.startswith(b"HTTP/1.1 408"), received[:200]
        assert b"BATCHER_API_BODY_TIMEOUT_S" in received
        assert await env.count() == 0


async def test_connections_over_the_cap_are_shed(db_url: str) -> None:
    async with api_env(db_url, api_max_connections=5) as env:
        held = []
        for _ in range(5):
            _, writer = await asyncio.open_connection("127.0.0.1", _port(env))
            writer.write(b"GET /healthz HTTP/1.1\r\n")  # unfinished: each holds its connection
            await writer.drain()
            held.append(writer)
        await asyncio.sleep(0)  # let the server take them (no timing is asserted)
        for _ in range(20):  # the server may not have registered all five yet: ask until it sheds
            shed = await _raw(env, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            if shed.startswith(b"HTTP/1.1 503"):
                break
        assert shed.startswith(b"HTTP/1.1 503"), shed[:200]
        assert b"too many connections" in shed
        for writer in held:
            writer.close()
            await writer.wait_closed()
        for _ in range(50):  # the held connections end; then a request is served again
            answer = await _raw(env, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if answer.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def _malformed(key: str) -> list[bytes]:
    k = key.encode()
    return [
        b"Bearer " + k + b"\x01x",
        b"Bearer " + k + b"\x00",
        b"Bearer " + k + b"\x7f",
        b"Bearer " + k + b"\x1b[2J",
        b"Bearer " + k + b"\rX",
        b"Bearer " + k + b"\nX-Other: y",
        b"Bearer\r\n " + k,  # obs-fold
        b"Bearer " + k + b"\xe9",  # not UTF-8
        b"Bearer " + k + b"\xff\xfe",
        b"Bearer " + k + b" " + b"x" * 9000,  # past the longest header aiohttp takes
        b"Bearer " + k + b"\t\x0b",
        k + b"\x01",  # no scheme
        b"Basic " + k + b"\x02",
    ]


async def test_a_malformed_authorization_header_shows_its_key_nowhere(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with api_env(db_url) as env:
        key = env.keys["acme"]
        secret_part = key[3:]  # the key without its public prefix
        for header in _malformed(key):
            for path in (b"/v1/jobs", b"/healthz"):
                request = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + header
                request += b"\r\n\r\n"
                received = await _raw(env, request)
                assert received.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4", b"HTTP/1.1 200")), received[:200]
                assert secret_part.encode() not in received, (header[:20], received[:300])
                status = int(received.split(b" ", 2)[1])
                if status >= 400:
                    body = orjson.loads(received.split(b"\r\n\r\n", 1)[1])
                    assert set(body["error"]) >= {"type", "message"}
    logged = caplog.text + "".join(logging.Formatter().format(r) for r in caplog.records)
    assert secret_part not in logged
    assert "Error handling request" not in logged


async def test_a_key_that_is_not_utf8_is_a_401(db_url: str) -> None:
    async with api_env(db_url) as env:
        received = await _raw(
            env, b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bk_\xe9\r\nConnection: close\r\n\r\n"
        )
        assert received.startswith(b"HTTP/1.1 401"), received[:200]
        body = orjson.loads(received.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["type"] == "unauthorized"
        assert body["error"]["field"] == "Authorization"
