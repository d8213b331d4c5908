"""The ``batcher`` command as a user runs it — a subprocess with ``BATCHER_DATABASE_URL`` — on SQLite and PostgreSQL.

Covers intake's "done when": a 100,000-line OpenAI batch file is queued whole and a second submit adds
nothing; a broken line refuses the file with the line named, exit code 1 and no traceback, and stores
nothing; ``--skip-invalid`` keeps the good lines and writes the rejects; options land on the jobs; bad
options are usage errors (exit code 2).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from alembic.script import ScriptDirectory

from batcher.db import migrate

BATCHER = Path(sys.executable).parent / "batcher"
BIG = 100_000
STATES = ("queued", "packed", "submitted", "fallback", "succeeded", "failed", "cancelled")


def openai_line(i: int) -> bytes:
    return orjson.dumps(
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]},
        }
    )


def write_openai_file(path: Path, n: int, *, broken: int | None = None) -> Path:
    """``n`` lines; line ``broken`` (1-based) is cut off mid-object."""
    with path.open("wb") as fh:
        for i in range(1, n + 1):
            fh.write((b'{"custom_id": "oops", "method": "POST", ' if i == broken else openai_line(i)) + b"\n")
    return path


def flat(text: str) -> str:
    """Terminal text without rich's box drawing and line wrapping, to match messages in."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@dataclass
class Cli:
    """Runs ``batcher …`` against one database."""

    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str | Path, code: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(BATCHER), *map(str, args)],
            env={**self.env, **env},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )
        assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def json(self, *args: str | Path) -> Any:
        return orjson.loads(self(*args, "--json").stdout)

    def totals(self) -> dict[str, int]:
        totals: dict[str, int] = self.json("status")["totals"]
        return totals


def make_cli(database_url: str, cwd: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHER_", "OPENAI_", "ANTHROPIC_"))}
    # a wide, plain terminal: messages are not wrapped inside rich's panels
    env.update(BATCHER_DATABASE_URL=database_url, COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return Cli(env, cwd)


@pytest.fixture
def cli(db_url: str, tmp_path: Path) -> Cli:
    """The CLI on an empty database, once per engine."""
    return make_cli(db_url, tmp_path)


@pytest.fixture
def offline_cli(tmp_path: Path) -> Cli:
    """The CLI for commands that must fail before touching the database (a SQLite file that should stay absent)."""
    return make_cli(f"sqlite+aiosqlite:///{tmp_path / 'untouched.db'}", tmp_path)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_openai_file(tmp_path_factory.mktemp("intake") / "big.jsonl", BIG)


def test_help_lists_the_commands(offline_cli: Cli) -> None:
    out = offline_cli("--help").stdout
    for command in ("submit", "status", "jobs", "db"):
        assert re.search(rf"^\W*{command}\b", out, re.MULTILINE), out


def test_db_upgrade_prints_the_revision(cli: Cli) -> None:
    head = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    assert f"database at revision {head}" in cli("db", "upgrade").stdout
    assert cli("db", "current").stdout.strip() == head
    assert f"database at revision {head}" in cli("db", "upgrade", "--revision", head).stdout


def test_db_upgrade_to_an_unknown_revision_names_it_and_the_known_ones(offline_cli: Cli) -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    err = offline_cli("db", "upgrade", "--revision", "bogus", code=1).stderr
    assert err.count("\n") == 1 and err.startswith("error: cannot upgrade to revision 'bogus' (")
    assert "Can't locate revision identified by 'bogus'" in err
    assert f"known revisions: head, {script.get_current_head()} (head), " in err
    for rev in script.walk_revisions():
        assert rev.revision in err
    help_text = flat(offline_cli("db", "upgrade", "--help").stdout)
    assert "--revision" in help_text and "up to --revision" in help_text and "REVISION (" not in help_text


def test_a_flag_takes_no_value(offline_cli: Cli) -> None:
    err = flat(offline_cli("status", "--json=false", code=2).stderr)
    assert "Option '--json' does not take a value" in err


def test_emulator_help_names_both_apis(offline_cli: Cli) -> None:
    out = flat(offline_cli("emulator", "--help").stdout)
    assert "OpenAI Files + Batches API" in out and "Anthropic Message Batches API" in out


def test_submit_100k_lines_then_again_adds_nothing(cli: Cli, big_file: Path) -> None:
    first = cli.json("submit", big_file, "--provider", "openai")
    assert first == {"run": "default", "received": BIG, "inserted": BIG, "duplicates": 0, "rejected": 0}
    assert cli.totals() == {"queued": BIG} | {s: 0 for s in STATES if s != "queued"}

    again = cli.json("submit", big_file, "--provider", "openai")
    assert again == {"run": "default", "received": BIG, "inserted": 0, "duplicates": BIG, "rejected": 0}
    assert cli.totals()["queued"] == BIG

    listed = cli.json("jobs", "--state", "queued", "--limit", "3")
    assert len(listed) == 3
    assert {j["state"] for j in listed} == {"queued"}
    assert len({j["id"] for j in listed}) == 3


def test_broken_line_refuses_the_whole_file(cli: Cli, tmp_path: Path) -> None:
    path = write_openai_file(tmp_path / "in.jsonl", 100, broken=57)
    # small chunks: rows before line 57 were already inserted when it failed, and must be rolled back
    proc = cli("submit", path, "--provider", "openai", code=1, BATCHER_INTAKE_CHUNK="10")
    err = flat(proc.stderr)
    assert "line 57: invalid JSON" in err
    assert "nothing was stored" in err
    assert proc.stdout == ""
    assert cli.totals() == {s: 0 for s in STATES}


def test_a_long_error_list_ends_with_a_newline(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(b"not json %d\n" % i for i in range(30)))
    err = cli("submit", path, "--provider", "openai", code=1).stderr
    assert err.endswith("  … and 10 more\n"), repr(err[-60:])
    assert "30 invalid line(s); nothing was stored." in err


def test_skip_invalid_stores_good_lines_and_writes_rejects(cli: Cli, tmp_path: Path) -> None:
    path = write_openai_file(tmp_path / "in.jsonl", 100, broken=57)
    rejects = tmp_path / "rejects.jsonl"
    out = cli.json("submit", path, "--provider", "openai", "--skip-invalid", rejects)
    assert (out["received"], out["inserted"], out["rejected"]) == (99, 99, 1)
    assert rejects.read_bytes().endswith(b"}\n")
    [reject] = [orjson.loads(line) for line in rejects.read_bytes().splitlines()]
    assert reject["line"] == 57
    assert "invalid JSON" in reject["error"]
    assert reject["input"].startswith('{"custom_id": "oops"')
    assert cli.totals()["queued"] == 99


def test_tags_deadline_and_priority_land_on_the_jobs(cli: Cli, tmp_path: Path) -> None:
    path = write_openai_file(tmp_path / "in.jsonl", 5)
    before = datetime.now(UTC)
    args = ["--run", "nightly", "--tag", "team=search", "--tag", "env=prod", "--deadline", "36h", "--priority", "7"]
    cli("submit", path, "--provider", "openai", *args)
    after = datetime.now(UTC)
    listed = cli.json("jobs", "--run", "nightly")
    assert sorted(j["custom_id"] for j in listed) == [f"req-{i}" for i in range(1, 6)]
    for job in listed:
        assert job["tags"] == {"team": "search", "env": "prod"}
        assert job["priority"] == 7
        not_after = datetime.fromisoformat(job["not_after"])
        assert before + timedelta(hours=36) <= not_after <= after + timedelta(hours=36)
    assert cli.json("jobs", "--run", "other") == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--tag", "x"], ["--tag", "'x' is not KEY=VALUE"]),
        (["--tag", "=v"], ["--tag", "is not KEY=VALUE"]),
        (["--deadline", "soon"], ["--deadline", "'soon' is not a duration", "36h"]),
        (["--priority", "high"], ["--priority", "integer"]),
        (["--provider", "bogus"], ["--provider", "bogus"]),
    ],
)
def test_bad_options_are_usage_errors(offline_cli: Cli, tmp_path: Path, args: list[str], words: list[str]) -> None:
    path = write_openai_file(tmp_path / "in.jsonl", 3)
    opts = ["--provider", "openai", *args] if "--provider" not in args else args
    err = flat(offline_cli("submit", path, *opts, code=2).stderr)
    assert "Usage: batcher submit" in err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "untouched.db").exists()


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_missing_file_is_a_clear_error(offline_cli: Cli, tmp_path: Path, dry_run: list[str]) -> None:
    err = flat(offline_cli("submit", tmp_path / "nope.jsonl", "--provider", "openai", *dry_run, code=2).stderr)
    assert "nope.jsonl does not exist" in err
    err = flat(offline_cli("submit", tmp_path, "--provider", "openai", *dry_run, code=2).stderr)
    assert f"{tmp_path} is a directory" in err
    assert not (tmp_path / "untouched.db").exists()


def anthropic_line(i: int) -> bytes:
    params = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    return orjson.dumps({"custom_id": f"req-{i}", "params": params})


@pytest.mark.parametrize(
    ("line", "provider", "words"),
    [
        (
            anthropic_line(1),
            "openai",
            "line 1: this is an Anthropic line (custom_id, params); use --provider anthropic",
        ),
        (
            openai_line(1),
            "anthropic",
            "line 1: this is an OpenAI line (custom_id, method, url, body); use --provider openai",
        ),
        (
            openai_line(1).replace(b'"gpt-4o-mini"', b"42"),
            "openai",
            "line 1: body.model must be a string (the model name), not 42",
        ),
        (
            openai_line(1).replace(b'"messages"', b'"max_tokens":"lots","messages"'),
            "openai",
            "line 1: body.max_tokens must be an integer from 1 to 2,147,483,647, not 'lots'",
        ),
        (
            openai_line(1).replace(b'"messages"', b'"max_tokens":' + b"1" * 31 + b',"messages"'),
            "openai",
            "line 1: body.max_tokens must be an integer from 1 to 2,147,483,647, not 1.11",
        ),
        (
            anthropic_line(1).replace(b'"max_tokens":10', b'"max_tokens":-5'),
            "anthropic",
            "line 1: params.max_tokens must be an integer from 1 to 2,147,483,647, not -5",
        ),
        (
            openai_line(1).replace(b"question", b"caf\xe9"),
            "openai",
            f"line 1: not UTF-8 text (byte 0xe9 at position {openai_line(1).index(b'question') + 3} of the line): "
            "batch files must be UTF-8",
        ),
    ],
)
def test_bad_lines_are_named_plainly(cli: Cli, tmp_path: Path, line: bytes, provider: str, words: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(line + b"\n")
    for extra in ([], ["--dry-run"]):  # the dry run says exactly what the submit says
        err = flat(cli("submit", path, "--provider", provider, *extra, code=1).stderr)
        assert words in err, err
    assert cli.totals() == {s: 0 for s in STATES}


def test_dry_run_refuses_duplicates_like_submit(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([openai_line(1), openai_line(2), openai_line(1), b"{oops"]) + b"\n")
    refusals = []
    for extra in (["--dry-run"], []):
        err = flat(cli("submit", path, "--provider", "openai", *extra, code=1).stderr)
        refusals.append(err[err.index("2 invalid line(s)") :])
    assert refusals[0] == refusals[1]
    assert "line 3: duplicate custom_id 'req-1' (first on line 1)" in refusals[0]
    assert "line 4: invalid JSON" in refusals[0]
    assert cli.totals() == {s: 0 for s in STATES}


def test_dry_run_with_skip_invalid_estimates_the_good_lines_and_writes_the_rejects(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([openai_line(1), openai_line(2), openai_line(1), openai_line(3)]) + b"\n")
    dry_rejects, real_rejects = tmp_path / "dry.jsonl", tmp_path / "real.jsonl"
    estimate = cli.json("submit", path, "--provider", "openai", "--dry-run", "--skip-invalid", dry_rejects)
    assert (estimate["jobs"], estimate["rejected"]) == (3, 1)
    assert cli.totals() == {s: 0 for s in STATES}
    out = flat(cli("submit", path, "--provider", "openai", "--dry-run", "--skip-invalid", dry_rejects).stdout)
    assert f"1 invalid line(s) left out (see {dry_rejects})" in out
    stored = cli.json("submit", path, "--provider", "openai", "--skip-invalid", real_rejects)
    assert (stored["inserted"], stored["rejected"]) == (3, 1)
    assert dry_rejects.read_bytes() == real_rejects.read_bytes()
    [reject] = map(orjson.loads, real_rejects.read_bytes().splitlines())
    assert (reject["line"], reject["error"]) == (3, "duplicate custom_id 'req-1' (first on line 1)")


def test_an_empty_file_warns_but_is_not_an_error(cli: Cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    proc = cli("submit", empty, "--provider", "openai")
    assert proc.stderr == f"warning: {empty} holds no requests; nothing was queued\n"
    assert "0 queued" in proc.stdout
    proc = cli("submit", empty, "--provider", "openai", "--json")
    assert orjson.loads(proc.stdout)["received"] == 0 and "holds no requests" in proc.stderr
    assert "holds no requests" in cli("submit", empty, "--provider", "openai", "--dry-run").stderr
    # a file with requests says nothing of the kind
    assert "holds no requests" not in cli("submit", write_openai_file(tmp_path / "one.jsonl", 1), "-p", "openai").stderr
