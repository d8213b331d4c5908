"""Webhook signing, the retry schedule and the callback URL policy: pure functions, no sockets."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from batcher.config import Settings
from batcher.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Attempt,
    InvalidSignature,
    check_callback_url,
    next_state,
    retry_delay_s,
    sign,
    verify,
)

SECRET = "whsec_test"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"event":"job.settled"}'
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, body) == f"v1={expected}"


def test_verify_accepts_fresh_signatures_and_refuses_the_rest() -> None:
    body = b"{}"
    headers = {TIMESTAMP_HEADER: "1700000000", SIGNATURE_HEADER: sign(SECRET, 1700000000, body)}
    verify(SECRET, body, headers, now_s=1700000100)
    verify(SECRET, body, {k.lower(): v for k, v in headers.items()}, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="off"):
        verify(SECRET, body, headers, now_s=1700000000 + 301)  # a replay
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(SECRET, b"{ }", headers, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="does not match"):
        verify("other", body, headers, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="does not match"):
        # the timestamp is signed too: moving it breaks the signature
        verify(SECRET, body, headers | {TIMESTAMP_HEADER: "1700000001"}, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="missing"):
        verify(SECRET, body, {TIMESTAMP_HEADER: "1700000000"}, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="unix seconds"):
        verify(SECRET, body, headers | {TIMESTAMP_HEADER: "soon"}, now_s=1700000000)


@pytest.mark.parametrize(
    ("attempts", "delay"), [(1, 10.0), (2, 20.0), (3, 40.0), (9, 2560.0), (10, 3600.0), (500, 3600.0)]
)
def test_retry_delay_doubles_up_to_the_cap(attempts: int, delay: float) -> None:
    assert retry_delay_s(attempts, base_s=10, max_s=3600) == delay


def test_next_state() -> None:
    settings = Settings()
    created = NOW - timedelta(hours=1)
    assert next_state(Attempt(True, 200), attempts=1, created_at=created, now=NOW, settings=settings, jitter=0) == {
        "last_status": 200,
        "last_error": None,
        "updated_at": NOW,
        "state": "delivered",
        "delivered_at": NOW,
        "next_attempt_at": None,
    }
    failed = Attempt(False, 500, "HTTP 500")
    again = next_state(failed, attempts=3, created_at=created, now=NOW, settings=settings, jitter=0.1)
    assert again["state"] == "pending"
    assert again["next_attempt_at"] == NOW + timedelta(seconds=44)
    # 24 h after scheduling, a failure is final
    late = next_state(
        failed, attempts=30, created_at=NOW - timedelta(hours=23, minutes=30), now=NOW, settings=settings, jitter=0
    )
    assert (late["state"], late["next_attempt_at"]) == ("failed", None)
    refused = Attempt(False, None, "refused", final=True)
    assert next_state(refused, attempts=1, created_at=NOW, now=NOW, settings=settings, jitter=0)["state"] == "failed"


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/batcher",
        "http://example.com:8080/a?b=c",
        "https://8.8.8.8/hook",
        "https://[2606:4700:4700::1111]/hook",
    ],
)
def test_public_callback_urls_pass(url: str) -> None:
    assert check_callback_url(url, allow_private=False) == url


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://example.com/x", "http"),
        ("example.com/x", "http"),
        ("http:///path", "no host"),
        ("http://example.com:99999/", "valid URL"),
        ("http://127.0.0.1/", "private"),
        ("http://10.0.0.8/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://100.64.0.1/", "private"),
        ("http://169.254.169.254/", "private"),
        ("http://0.0.0.0/", "private"),
        ("http://[::1]/", "private"),
        ("http://[fd00::1]/", "private"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://224.0.0.1/", "private"),
        ("http://localhost:8000/", "local machine"),
        ("http://LOCALHOST./", "local machine"),
        ("http://x.localhost/", "local machine"),
    ],
)
def test_private_and_bad_callback_urls_are_refused(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_callback_url(url, allow_private=False)


def test_private_callback_urls_pass_when_allowed() -> None:
    assert check_callback_url("http://127.0.0.1:9000/hook", allow_private=True)
    assert check_callback_url("http://localhost/hook", allow_private=True)
    with pytest.raises(ValueError, match="http"):
        check_callback_url("file:///etc/passwd", allow_private=True)
