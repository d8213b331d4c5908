"""Durations and clocks. Pure code takes ``now`` as a parameter; only the edges call :func:`utcnow`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_duration(text: str) -> timedelta:
    """``"36h"``, ``"90m"``, ``"7d"``, ``"45s"`` or plain seconds → timedelta.

    Raises:
        ValueError: the text is not a duration; the message shows the accepted forms.
    """
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration; use e.g. 45s, 90m, 36h, 7d")
    value, unit = match.groups()
    return timedelta(seconds=float(value) * _UNIT_S[unit or "s"])
