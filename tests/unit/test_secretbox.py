"""Webhook secrets at rest: sealing, the key from the environment or a key file, and the errors (no sockets)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from batcher.config import Settings
from batcher.errors import ConfigError
from batcher.secretbox import SEALED_PREFIX, SecretBox, SecretKeyMismatch, secret_box

KEY = base64.b64encode(b"\x01" * 32).decode()
OTHER_KEY = base64.b64encode(b"\x02" * 32).decode()
PLAIN = "whsec_" + base64.b64encode(b"s" * 32).decode()


def test_seal_and_open_round_trip_and_never_show_the_plaintext() -> None:
    box = SecretBox(base64.b64decode(KEY), source="BATCHER_SECRET_KEY")
    sealed = box.seal(PLAIN, context="acme")
    assert sealed.startswith(SEALED_PREFIX + box.key_id + ":")
    assert PLAIN not in sealed and PLAIN.removeprefix("whsec_") not in sealed
    assert box.seal(PLAIN, context="acme") != sealed  # a fresh nonce each time
    assert box.open(sealed, context="acme") == PLAIN


def test_a_sealed_secret_opens_only_with_its_key_and_for_its_tenant() -> None:
    box = SecretBox(base64.b64decode(KEY), source="BATCHER_SECRET_KEY")
    other = SecretBox(base64.b64decode(OTHER_KEY), source="key file /x/batcher.db.key")
    sealed = box.seal(PLAIN, context="acme")
    with pytest.raises(SecretKeyMismatch, match="BATCHER_SECRET_KEY") as caught:
        other.open(sealed, context="acme")
    assert box.key_id in str(caught.value) and other.key_id in str(caught.value)
    assert PLAIN not in str(caught.value) and KEY not in str(caught.value)
    # copied into another tenant's row, it does not open
    with pytest.raises(ConfigError, match="globex"):
        box.open(sealed, context="globex")
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(ConfigError, match="acme"):
        box.open(tampered, context="acme")


@pytest.mark.parametrize(
    "value",
    ["not base64!", base64.b64encode(b"short").decode(), base64.b64encode(b"x" * 33).decode()],
)
def test_a_bad_key_setting_is_refused_without_showing_it(value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(secret_key=SecretStr(value))
    (error,) = caught.value.errors()
    assert error["loc"] == ("secret_key",)
    assert "32 bytes" in error["msg"] and "base64" in error["msg"]
    assert value not in str(caught.value)


def test_the_key_comes_from_the_setting_first(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'batcher.db'}"
    box = secret_box(Settings(database_url=url, secret_key=SecretStr(KEY)))
    assert box.source == "BATCHER_SECRET_KEY"
    assert not (tmp_path / "batcher.db.key").exists()
    # urlsafe base64 is accepted too
    urlsafe = base64.urlsafe_b64encode(b"\xfb" * 32).decode()
    assert secret_box(Settings(database_url=url, secret_key=SecretStr(urlsafe))).key_id != box.key_id


def test_sqlite_without_a_key_makes_a_private_key_file_next_to_the_database(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'batcher.db'}"
    box = secret_box(Settings(database_url=url))
    path = tmp_path / "batcher.db.key"
    assert box.source == f"key file {path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text().strip())) == 32
    assert not [p for p in tmp_path.iterdir() if p.name not in ("batcher.db.key",)]  # no temporary file left
    # another process on the same database reads the same key
    sealed = box.seal(PLAIN, context="acme")
    again = SecretBox.from_key_file(path)
    assert again.open(sealed, context="acme") == PLAIN


def test_a_broken_key_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "batcher.db.key"
    path.write_text("nonsense\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match=str(path)) as caught:
        SecretBox.from_key_file(path)
    assert "nonsense" not in str(caught.value)


def test_postgresql_without_a_key_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="BATCHER_SECRET_KEY"):
        secret_box(Settings(database_url="postgresql+asyncpg://u@db.invalid/batcher"))
