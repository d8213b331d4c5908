"""Webhook secrets at rest: sealed with AES-256-GCM under a key that is not in the database.

The key (32 random bytes) comes from ``BATCHER_SECRET_KEY`` (base64). When that is not set:

- a SQLite database file gets a key file next to it, ``<database>.key`` (mode 0600), made on first use; every
  process on that machine using the database (API, worker, CLI) reads the same file;
- an in-memory SQLite database gets a key for this process only (nothing outlives it anyway);
- PostgreSQL has no "next to the database": :func:`secret_box` raises :class:`~batcher.errors.ConfigError`, so an
  API server (or a worker of a database with tenants) refuses to start rather than store a secret it cannot seal.

A sealed value is ``sealed:v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>``. The key id (8 hex characters of
an HMAC of the key, which says nothing about the key) names the key it was sealed with, so a process given another
key says so plainly instead of failing to sign. The tenant's name is the associated data: a sealed secret copied
into another tenant's row does not open.

Errors::

    ConfigError
    ├── SealedSecretError     a sealed value that does not open (damaged, or another tenant's)
    │   └── SecretKeyMismatch it was sealed with another key than this process has
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from batcher.config import Settings
from batcher.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["SEALED_PREFIX", "SealedSecretError", "SecretBox", "SecretKeyMismatch", "decode_key", "secret_box"]

SEALED_PREFIX = "sealed:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE_SUFFIX = ".key"
_AAD = "batcher/tenant-webhook-secret/"
HOW_TO_MAKE = 'make one with: python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"'


class SealedSecretError(ConfigError):
    """A sealed secret does not open: damaged, or moved from another tenant's row."""


class SecretKeyMismatch(SealedSecretError):
    """A secret was sealed with another key than the one this process has."""


def decode_key(text: str) -> bytes:
    """32 bytes from base64 (standard or URL-safe, padding optional).

    Raises:
        ValueError: not base64, or not 32 bytes (the message never repeats the value).
    """
    cleaned = text.strip()
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        raw = base64.b64decode(cleaned.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be 32 bytes in base64; {HOW_TO_MAKE}") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"must be 32 bytes in base64 (it decodes to {len(raw)} bytes); {HOW_TO_MAKE}")
    return raw


class SecretBox:
    """Seals and opens tenants' webhook secrets with one AES-256-GCM key.

    Args:
        key: the 32-byte key.
        source: where the key came from, for messages (``BATCHER_SECRET_KEY``, ``key file …``).
    """

    def __init__(self, key: bytes, *, source: str) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("a secret box key is 32 bytes")
        self._aead = AESGCM(key)
        self.key_id = hmac.new(key, b"batcher key id", hashlib.sha256).hexdigest()[:8]
        self.source = source

    def __repr__(self) -> str:
        return f"SecretBox(key_id={self.key_id!r}, source={self.source!r})"

    @classmethod
    def from_key_file(cls, path: Path) -> SecretBox:
        """The key in ``path`` (base64 text).

        Raises:
            ConfigError: the file cannot be read or does not hold a key.
        """
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the secret key file {path}: {exc.strerror or exc}") from None
        try:
            key = decode_key(text)
        except ValueError as exc:
            raise ConfigError(f"the secret key file {path} {exc}") from None
        if stat.S_IMODE(mode) & 0o077:
            logger.warning("the secret key file %s can be read by other users: chmod 600 it", path)
        return cls(key, source=f"key file {path}")

    def seal(self, plaintext: str, *, context: str) -> str:
        """``plaintext`` sealed for ``context`` (the tenant's name)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), (_AAD + context).encode())
        token = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{SEALED_PREFIX}{self.key_id}:{token}"

    def open(self, sealed: str, *, context: str) -> str:
        """The plaintext of a value :meth:`seal` made for ``context``.

        Raises:
            SecretKeyMismatch: it was sealed with another key.
            SealedSecretError: it is damaged, or was sealed for another tenant.
        """
        if not sealed.startswith(SEALED_PREFIX):
            raise SealedSecretError(f"tenant {context!r}'s webhook secret is not a sealed value")
        key_id, _, token = sealed[len(SEALED_PREFIX) :].partition(":")
        if key_id != self.key_id:
            raise SecretKeyMismatch(
                f"tenant {context!r}'s webhook secret was sealed with key {key_id}, but this process has key "
                f"{self.key_id} (from {self.source}): give every process of this database the same "
                "BATCHER_SECRET_KEY (or the same key file)"
            )
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], (_AAD + context).encode()).decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise SealedSecretError(
                f"tenant {context!r}'s webhook secret does not open: the stored value is damaged or belongs to "
                "another tenant (rotate it with `batcher tenants rotate-secret`)"
            ) from None


def sealed_key_id(sealed: str) -> str | None:
    """The id of the key a sealed value was sealed with (``None``: not a sealed value)."""
    if not sealed.startswith(SEALED_PREFIX):
        return None
    return sealed[len(SEALED_PREFIX) :].partition(":")[0]


def new_key() -> str:
    """A fresh key, base64: a value for ``BATCHER_SECRET_KEY``."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


# ------------------------------------------------------------------------------------------------ resolution

_boxes: dict[tuple[str, str | None], SecretBox] = {}
_lock = threading.Lock()


def _sqlite_file(database_url: str) -> Path | None:
    """The database file of a SQLite URL; ``None`` for an in-memory database."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        return None
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):
        database = database[len("file:") :].split("?", 1)[0]
    return Path(database)


def key_file_path(database_url: str) -> Path | None:
    """Where the key file of a SQLite database is (``None``: not a SQLite file)."""
    if not database_url.startswith("sqlite"):
        return None
    found = _sqlite_file(database_url)
    return None if found is None else found.with_name(found.name + KEY_FILE_SUFFIX)


def _make_key_file(path: Path) -> None:
    """Write a new key to ``path`` unless it exists, atomically: a concurrent start reads one whole key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(new_key() + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)  # fails if another process made it first: then its key is the key
            logger.info("made a secret key file %s for the webhook secrets of this database; back it up", path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def secret_box(settings: Settings) -> SecretBox:
    """The box that seals the webhook secrets of ``settings.database_url`` (one per process and database).

    Raises:
        ConfigError: no key is configured and the database is not a SQLite file (PostgreSQL), or the key file is
            unreadable or broken.
    """
    given = settings.secret_key.get_secret_value() if settings.secret_key is not None else None
    cache_key = (settings.database_url, given)
    with _lock:
        found = _boxes.get(cache_key)
        if found is not None:
            return found
        if given is not None:
            box = SecretBox(decode_key(given), source="BATCHER_SECRET_KEY")
        elif not settings.database_url.startswith("sqlite"):
            raise ConfigError(
                "BATCHER_SECRET_KEY is not set: on PostgreSQL every API server and worker needs the same key to "
                f"seal and open the tenants' webhook secrets; {HOW_TO_MAKE}"
            )
        else:
            path = key_file_path(settings.database_url)
            if path is None:
                box = SecretBox(secrets.token_bytes(KEY_BYTES), source="a key of this process (in-memory database)")
            else:
                if not path.exists():
                    try:
                        _make_key_file(path)
                    except OSError as exc:
                        raise ConfigError(
                            f"cannot make the secret key file {path}: {exc.strerror or exc} (set BATCHER_SECRET_KEY)"
                        ) from None
                box = SecretBox.from_key_file(path)
        _boxes[cache_key] = box
        return box
