"""The pure policies behind the fault handling: retry delays, deadline flushing, per-provider turnaround, and the
emulator's fault dice (malformed lines, named expiries, fault kinds). No sockets."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from batcher.config import AccountSettings, Settings
from batcher.emulator.lifecycle import is_fated_to_expire
from batcher.emulator.results import line_malformed, malform
from batcher.emulator.settings import EmulatorSettings
from batcher.packer import FlushReason, GroupKey, GroupStats, flush_reason, retry_delay
from batcher.providers.limits import OPENAI_LIMITS

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("failures", "retry_after", "jitter", "expected"),
    [
        (1, None, 0.0, 1.0),
        (2, None, 0.0, 2.0),
        (3, None, 0.0, 4.0),
        (9, None, 0.0, 8.0),  # capped at max_s
        (1, None, 0.999, 1.4995),  # up to half again on top
        (4, None, 1.0, 12.0),
        (1, 30.0, 0.7, 30.0),  # Retry-After as given, no jitter
        (5, 0.2, 0.5, 1.0),  # never below the base
    ],
)
def test_retry_delay(failures: int, retry_after: float | None, jitter: float, expected: float) -> None:
    delay = retry_delay(failures, base_s=1.0, max_s=8.0, retry_after_s=retry_after, jitter=jitter, spread=0.5)
    assert delay == pytest.approx(expected)


def test_retry_delay_jitter_spreads_workers_apart() -> None:
    rng = random.Random(3)
    delays = {
        retry_delay(2, base_s=1.0, max_s=8.0, retry_after_s=None, jitter=rng.random(), spread=0.5) for _ in range(50)
    }
    assert len(delays) == 50 and min(delays) >= 2.0 and max(delays) <= 3.0


def test_flush_reason_deadline_lead() -> None:
    stats = GroupStats(GroupKey("openai", "openai", "/v1/chat/completions", "m"), 1, 100, NOW, NOW + timedelta(hours=2))
    common = {"max_wait_s": 3600.0, "turnaround_s": 3600.0}
    assert flush_reason(stats, OPENAI_LIMITS, NOW, **common) is None
    # with a lead of an hour, two hours is the last moment
    assert flush_reason(stats, OPENAI_LIMITS, NOW, lead_s=3600.0, **common) is FlushReason.DEADLINE


def test_turnaround_by_account_then_provider_then_default() -> None:
    settings = Settings(
        expected_turnaround_s=100.0,
        provider_turnaround_s={"anthropic": 50.0, "groq": 20.0},
        providers={"together": AccountSettings(expected_turnaround_s=10.0)},
    )
    assert settings.turnaround_s("together", "openai") == 10.0
    assert settings.turnaround_s("groq", "openai") == 20.0
    assert settings.turnaround_s("anthropic", "anthropic") == 50.0
    assert settings.turnaround_s("claude-2", "anthropic") == 50.0
    assert settings.turnaround_s("openai", "openai") == 100.0


def test_turnaround_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHER_PROVIDER_TURNAROUND_S", '{"anthropic": 1800}')
    monkeypatch.setenv("BATCHER_FALLBACK_ENABLED", "false")
    settings = Settings()
    assert settings.turnaround_s("anthropic", "anthropic") == 1800.0
    assert settings.fallback_enabled is False


def test_malformed_lines_are_unreadable_and_deterministic() -> None:
    line = orjson.dumps({"custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None}) + b"\n"
    bad = malform(line)
    assert bad.endswith(b"\n") and len(bad) < len(line)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(bad)
    picked = [c for c in (f"c{i}" for i in range(1000)) if line_malformed(7, 1, c, 0.1)]
    assert 50 < len(picked) < 150
    assert picked == [c for c in (f"c{i}" for i in range(1000)) if line_malformed(7, 1, c, 0.1)]
    assert not any(line_malformed(7, 1, f"c{i}", 0.0) for i in range(100))


def test_expiry_by_ordinal() -> None:
    assert [n for n in range(1, 10) if is_fated_to_expire(0, n, 0.0, frozenset({3}))] == [3]


def test_emulator_fault_knobs_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHER_EMULATOR_API_ERROR_KINDS", '["reset", "503"]')
    monkeypatch.setenv("BATCHER_EMULATOR_EXPIRE_ORDINALS", "[3]")
    monkeypatch.setenv("BATCHER_EMULATOR_MALFORMED_RATE", "0.05")
    monkeypatch.setenv("BATCHER_EMULATOR_RETRY_AFTER_S", "7")
    emu = EmulatorSettings()
    assert emu.api_error_kinds == ["reset", "503"]
    assert emu.expire_ordinals == frozenset({3})
    assert (emu.malformed_rate, emu.retry_after_s) == (0.05, 7)
    with pytest.raises(ValueError):
        EmulatorSettings(api_error_kinds=["418"])  # type: ignore[list-item]
