"""Reading a Message Batches create body, ``{"requests": [{"custom_id", "params"}, …]}``, as a stream.

A body may be 256 MB, so it is never held whole: :class:`RequestsBodyParser` is fed chunks as they arrive, cuts
the ``requests`` array into its elements with a tokenizer that only looks at strings and brackets, parses one
element at a time, checks it as the real API does at create time, and appends it to a JSONL file as
``{"custom_id", "params"}``. Memory grows only with the set of custom_ids (uniqueness needs it) and the largest
single element.

Create-time checks (``params`` themselves are checked later, per request, and fail as ``errored`` results):
the body is a JSON object whose only key is ``requests``; ``requests`` is a list of 1..``max_requests`` objects,
each with exactly ``custom_id`` (``^[a-zA-Z0-9_-]{1,64}$``, unique in the batch) and ``params`` (an object); the
body is at most ``max_bytes``. Messages name the field as Anthropic's do: ``requests.3.custom_id: …``.

Synchronous; callers run :meth:`RequestsBodyParser.feed` in a worker thread.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from batcher.emulator.anthropic_errors import AnthropicApiError, invalid_request

logger = logging.getLogger(__name__)

__all__ = ["CUSTOM_ID_PATTERN", "ParsedRequests", "RequestsBodyParser", "check_request"]

CUSTOM_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_REQUEST_FIELDS = ("custom_id", "params")
_NOT_JSON = "The request body is not valid JSON."

# A complete string literal, a structural character, or a lone quote (a string not finished in this buffer).
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:,]|"', re.DOTALL)
_QUOTE, _OPEN_OBJ, _CLOSE_OBJ, _OPEN_ARR, _CLOSE_ARR, _COLON, _COMMA = b'"{}[]:,'


class _Stage(enum.Enum):
    OBJECT = enum.auto()  # before the body's opening brace
    KEY = enum.auto()  # expecting a top-level key (or the closing brace of an empty object)
    COLON = enum.auto()
    VALUE = enum.auto()  # expecting the '[' of requests
    ELEMENT = enum.auto()  # inside the requests array
    AFTER_VALUE = enum.auto()  # after the array: ',' or '}'
    DONE = enum.auto()


@dataclass(slots=True)
class ParsedRequests:
    """What a create body held.

    Attributes:
        count: Requests written.
        custom_ids: Every custom_id (all distinct).
        bytes: Size of the body.
    """

    count: int = 0
    custom_ids: set[str] = field(default_factory=set)
    bytes: int = 0


def check_request(index: int, obj: object, seen: set[str]) -> tuple[str, dict[str, Any]]:
    """Check one element of ``requests`` as the API does at create time.

    Args:
        index: The element's position (0-based), for the message.
        obj: The parsed element.
        seen: custom_ids of the earlier elements.

    Returns:
        The custom_id and the params.

    Raises:
        AnthropicApiError: 400 ``invalid_request_error`` naming the field.
    """
    where = f"requests.{index}"
    if not isinstance(obj, dict):
        raise invalid_request(f"{where}: Input should be a valid dictionary")
    for name in obj:
        if name not in _REQUEST_FIELDS:
            raise invalid_request(f"{where}.{name}: Extra inputs are not permitted")
    if "custom_id" not in obj:
        raise invalid_request(f"{where}.custom_id: Field required")
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str):
        raise invalid_request(f"{where}.custom_id: Input should be a valid string")
    if not custom_id:
        raise invalid_request(f"{where}.custom_id: String should have at least 1 character")
    if len(custom_id) > 64:
        raise invalid_request(f"{where}.custom_id: String should have at most 64 characters")
    if not CUSTOM_ID_PATTERN.match(custom_id):
        raise invalid_request(f"{where}.custom_id: String should match pattern '{CUSTOM_ID_PATTERN.pattern}'")
    if custom_id in seen:
        raise invalid_request(
            f"{where}.custom_id: Duplicate custom_id '{custom_id}'; each custom_id must be unique within a batch"
        )
    if "params" not in obj:
        raise invalid_request(f"{where}.params: Field required")
    params = obj["params"]
    if not isinstance(params, dict):
        raise invalid_request(f"{where}.params: Input should be a valid dictionary")
    return custom_id, params


class RequestsBodyParser:
    """Incremental reader of a create body; writes the requests to ``out`` as JSONL.

    Args:
        out: Binary file the ``{"custom_id", "params"}`` lines are appended to.
        max_requests: Most requests allowed.
        max_bytes: Largest body allowed.

    Raises (from :meth:`feed` and :meth:`finish`):
        AnthropicApiError: 400 for a malformed or invalid body, 413 ``request_too_large`` past ``max_bytes``.
    """

    def __init__(self, out: IO[bytes], *, max_requests: int, max_bytes: int) -> None:
        self._out = out
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._buf = bytearray()
        self._pos = 0  # where scanning resumes; always outside a string
        self._start = 0  # where the current element begins (stage ELEMENT)
        self._depth = 0  # nesting inside the current element
        self._stage = _Stage.OBJECT
        self._has_requests = False
        self._elements = 0  # elements seen, including those past max_requests
        self.result = ParsedRequests()

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the body."""
        self.result.bytes += len(chunk)
        if self.result.bytes > self._max_bytes:
            raise AnthropicApiError(
                "request_too_large",
                f"Request exceeds the maximum allowed number of bytes ({self._max_bytes}) for a Message Batch.",
            )
        self._buf += chunk
        self._scan()
        keep_from = self._start if self._stage is _Stage.ELEMENT else self._pos
        if keep_from:
            del self._buf[:keep_from]
            self._pos -= keep_from
            self._start -= keep_from

    def finish(self) -> ParsedRequests:
        """The body is complete: check what only the whole body can tell.

        Returns:
            Counts and custom_ids of the requests written.
        """
        tail = bytes(self._buf[self._pos :]).strip()
        if self._stage is _Stage.OBJECT and not tail:
            raise invalid_request("requests: Field required")
        if self._stage is _Stage.OBJECT:
            raise invalid_request("The request body must be a JSON object.")
        if self._stage is not _Stage.DONE or tail:
            raise invalid_request(_NOT_JSON)
        if not self._has_requests:
            raise invalid_request("requests: Field required")
        if self._elements == 0:
            raise invalid_request("requests: List should have at least 1 item after validation, not 0")
        if self._elements > self._max_requests:
            raise invalid_request(
                f"requests: List should have at most {self._max_requests} items after validation, not {self._elements}"
            )
        return self.result

    # ------------------------------------------------------------------ tokenizer

    def _gap_is_blank(self, end: int) -> bool:
        return not bytes(self._buf[self._pos : end]).strip()

    def _scan(self) -> None:
        buf = self._buf
        for match in _TOKEN.finditer(buf, self._pos):
            at, end = match.start(), match.end()
            first = buf[at]
            if first == _QUOTE and end - at == 1:
                self._pos = at  # an unfinished string: wait for more bytes
                return
            if self._stage is _Stage.ELEMENT:
                self._element_token(first, at)
            else:
                self._structure_token(first, at, end)
            self._pos = end
        # What follows the last token (blanks, or a scalar still being read) stays in the buffer.

    def _structure_token(self, first: int, at: int, end: int) -> None:
        stage = self._stage
        if not self._gap_is_blank(at):
            self._misplaced(stage)
        if stage is _Stage.OBJECT:
            if first != _OPEN_OBJ:
                raise invalid_request("The request body must be a JSON object.")
            self._stage = _Stage.KEY
        elif stage is _Stage.KEY:
            if first == _CLOSE_OBJ and not self._has_requests:
                self._stage = _Stage.DONE
                return
            if first != _QUOTE:
                raise invalid_request(_NOT_JSON)
            key = orjson.loads(bytes(self._buf[at:end]))
            if key != "requests":
                raise invalid_request(f"{key}: Extra inputs are not permitted")
            if self._has_requests:
                raise invalid_request("requests: given more than once")
            self._has_requests = True
            self._stage = _Stage.COLON
        elif stage is _Stage.COLON:
            if first != _COLON:
                raise invalid_request(_NOT_JSON)
            self._stage = _Stage.VALUE
        elif stage is _Stage.VALUE:
            if first != _OPEN_ARR:
                raise invalid_request("requests: Input should be a valid list")
            self._stage = _Stage.ELEMENT
            self._start, self._depth = end, 0
        elif stage is _Stage.AFTER_VALUE:
            if first == _COMMA:
                self._stage = _Stage.KEY
            elif first == _CLOSE_OBJ:
                self._stage = _Stage.DONE
            else:
                raise invalid_request(_NOT_JSON)
        else:
            raise invalid_request(_NOT_JSON)

    def _misplaced(self, stage: _Stage) -> None:
        """Something other than blanks before a structural token: a scalar where a token was due."""
        if stage is _Stage.OBJECT:
            raise invalid_request("The request body must be a JSON object.")
        if stage is _Stage.VALUE:
            raise invalid_request("requests: Input should be a valid list")
        raise invalid_request(_NOT_JSON)

    def _element_token(self, first: int, at: int) -> None:
        if first in (_OPEN_OBJ, _OPEN_ARR):
            self._depth += 1
        elif first in (_CLOSE_OBJ, _CLOSE_ARR):
            if self._depth:
                self._depth -= 1
            elif first == _CLOSE_ARR:
                raw = bytes(self._buf[self._start : at]).strip()
                if raw or self._elements:
                    self._element(raw)
                self._stage = _Stage.AFTER_VALUE
            else:
                raise invalid_request(_NOT_JSON)
        elif first == _COMMA and not self._depth:
            self._element(bytes(self._buf[self._start : at]).strip())
            self._start = at + 1

    def _element(self, raw: bytes) -> None:
        index = self._elements
        self._elements += 1
        if not raw:
            raise invalid_request(_NOT_JSON)
        if self._elements > self._max_requests:
            return  # keep counting for the message, write nothing more
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise invalid_request(_NOT_JSON) from None
        custom_id, params = check_request(index, obj, self.result.custom_ids)
        self.result.custom_ids.add(custom_id)
        self.result.count += 1
        self._out.write(orjson.dumps({"custom_id": custom_id, "params": params}, option=orjson.OPT_APPEND_NEWLINE))
