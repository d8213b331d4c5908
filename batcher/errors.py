"""batcher's exceptions. Foreign errors are translated where they enter, the original kept as ``__cause__``.

Tree::

    BatcherError
    ├── InvalidInput            a user's input is wrong (``line`` / ``field`` say where)
    │   └── InvalidFile         a batch file was refused as a whole (``errors`` lists each bad line)
    ├── NotFound                an id that does not exist
    ├── StateConflict           a transition the state machine does not allow, or a race lost
    ├── ConfigError             settings that cannot work together
    └── ProviderError           a provider call failed (``provider``, ``retryable``, ``retry_after_s``)
"""

from __future__ import annotations

from collections.abc import Sequence


class BatcherError(Exception):
    """Root of every error batcher raises on purpose."""


class InvalidInput(BatcherError):
    """Bad input from a user. The message says what was wrong and how to fix it."""

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        self.line = line
        self.field = field
        prefix = f"line {line}: " if line is not None else ""
        super().__init__(prefix + message)
        self.reason = message


class InvalidFile(InvalidInput):
    """A batch file refused whole; ``errors`` holds the first problems found, each with its line."""

    def __init__(self, path: str, errors: Sequence[InvalidInput], total: int) -> None:
        self.path = path
        self.errors = list(errors)
        self.total = total
        shown = "\n".join(f"  {e}" for e in self.errors)
        more = f"\n  … and {total - len(self.errors)} more" if total > len(self.errors) else ""
        BatcherError.__init__(self, f"{path}: {total} invalid line(s); nothing was stored.\n{shown}{more}")
        self.line = self.errors[0].line if self.errors else None
        self.field = None
        self.reason = str(self)


class NotFound(BatcherError):
    """No object with that id."""


class StateConflict(BatcherError):
    """The requested transition is not allowed from the current state (or another worker won the race)."""


class ConfigError(BatcherError):
    """Settings that cannot work."""


class ProviderError(BatcherError):
    """A provider call failed.

    Attributes:
        provider: provider name.
        retryable: whether trying again later may succeed.
        retry_after_s: the provider's Retry-After, when it sent one.
    """

    def __init__(self, message: str, *, provider: str, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.retryable = retryable
        self.retry_after_s = retry_after_s
