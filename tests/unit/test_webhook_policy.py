"""Webhook signing, the retry schedule and the callback URL policy: pure functions, no sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from batcher.config import Settings
from batcher.webhooks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Attempt,
    InvalidSignature,
    check_callback_url,
    next_state,
    retry_delay_s,
    sign,
    signature_header,
    verify,
)

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 32).decode()
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_signature_is_the_standard_webhooks_one() -> None:
    # the Standard Webhooks / Svix test vector
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    mac = hmac.new(key, b"d1.1700000000." + body, hashlib.sha256).digest()
    assert sign(SECRET, "d1", 1700000000, body) == "v1," + base64.b64encode(mac).decode()


def test_verify_accepts_fresh_signatures_and_refuses_the_rest() -> None:
    body = b"{}"
    headers = {ID_HEADER: "d1", TIMESTAMP_HEADER: "1700000000", SIGNATURE_HEADER: sign(SECRET, "d1", 1700000000, body)}
    verify(SECRET, body, headers, now_s=1700000100)
    verify(SECRET, body, {k.upper(): v for k, v in headers.items()}, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="off"):
        verify(SECRET, body, headers, now_s=1700000000 + 301)  # a replay
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(SECRET, b"{ }", headers, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(OTHER, body, headers, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="does not match"):
        # the timestamp is signed too: moving it breaks the signature
        verify(SECRET, body, headers | {TIMESTAMP_HEADER: "1700000001"}, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="does not match"):
        # and so is the id: a captured delivery replayed under a new id is refused
        verify(SECRET, body, headers | {ID_HEADER: "d2"}, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="missing"):
        verify(SECRET, body, {TIMESTAMP_HEADER: "1700000000", SIGNATURE_HEADER: "v1,x"}, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="unix seconds"):
        verify(SECRET, body, headers | {TIMESTAMP_HEADER: "soon"}, now_s=1700000000)
    with pytest.raises(InvalidSignature, match="whsec_"):
        verify("not base64 !", body, headers, now_s=1700000000)


def test_signatures_of_two_secrets_verify_with_either_and_with_standardwebhooks() -> None:
    body = b'{"event":"job.settled"}'
    now = int(datetime.now(UTC).timestamp())
    header = signature_header([SECRET, OTHER], "d1", now, body)
    assert header.count("v1,") == 2 and " " in header
    headers = {ID_HEADER: "d1", TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: header}
    for secret in (SECRET, OTHER):
        verify(secret, body, headers)
        assert Webhook(secret).verify(body, headers) == {"event": "job.settled"}
    third = "whsec_" + base64.b64encode(b"t" * 32).decode()
    with pytest.raises(InvalidSignature):
        verify(third, body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(third).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, headers | {ID_HEADER: "d2"})


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
