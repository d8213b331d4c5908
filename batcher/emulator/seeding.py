"""Stable, seedable hashing used for every random decision of the emulator.

Python's ``hash()`` is salted per process, so decisions are derived from BLAKE2b digests of their
inputs instead: the same seed and the same inputs give the same outcome in every run.
"""

from __future__ import annotations

import hashlib
import logging

logger = logging.getLogger(__name__)

__all__ = ["stable_hex", "stable_int", "stable_unit"]


def _digest(parts: tuple[object, ...], size: int) -> bytes:
    material = "\x1f".join(str(part) for part in parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(material, digest_size=size).digest()


def stable_int(*parts: object) -> int:
    """Return a 64-bit unsigned integer derived from ``parts``."""
    return int.from_bytes(_digest(parts, 8), "big")


def stable_unit(*parts: object) -> float:
    """Return a float in ``[0, 1)`` derived from ``parts``."""
    return stable_int(*parts) / 2.0**64


def stable_hex(length: int, *parts: object) -> str:
    """Return ``length`` lowercase hex characters derived from ``parts`` (``length`` <= 128)."""
    return _digest(parts, (length + 1) // 2).hex()[:length]
