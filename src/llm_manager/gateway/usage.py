"""Token usage extraction from relayed responses, without buffering or re-parsing them whole.

Understood: OpenAI ``usage`` (prompt/completion tokens), llama.cpp ``timings`` (``cache_n``,
``prompt_n``, ``predicted_n``; some builds put ``cache_n``/``prompt_n`` in ``usage``),
Anthropic ``input_tokens``/``output_tokens`` (``message_start`` then ``message_delta`` when
streamed), and the Responses API (``response.completed`` carries ``response.usage``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import msgspec

_DECODER = json.JSONDecoder()
_MARKERS = (b'"usage"', b'"timings"')
MAX_SSE_LINE = 1 << 20  # a data line longer than this cannot be scanned; it is skipped


# Every method spells its five fields out (no loop over dataclasses.fields(), no getattr):
# usage is read from every relayed answer, and each call here is CPU on the hot path.
@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cache_n: int | None = None
    prompt_n: int | None = None
    predicted_n: int | None = None

    def merge(self, other: Usage) -> None:
        """Take every field the other one knows (later events refine earlier ones)."""
        if other.prompt_tokens is not None:
            self.prompt_tokens = other.prompt_tokens
        if other.completion_tokens is not None:
            self.completion_tokens = other.completion_tokens
        if other.cache_n is not None:
            self.cache_n = other.cache_n
        if other.prompt_n is not None:
            self.prompt_n = other.prompt_n
        if other.predicted_n is not None:
            self.predicted_n = other.predicted_n

    def completed(self) -> Usage:
        """Fill token counts from llama.cpp's timings when no ``usage`` came (its streams
        carry ``timings`` only, unless the client asked for ``include_usage``)."""
        prompt, completion = self.prompt_tokens, self.completion_tokens
        if prompt is None and self.prompt_n is not None:
            prompt = self.prompt_n + (self.cache_n or 0)
        if completion is None and self.predicted_n is not None:
            completion = self.predicted_n
        return Usage(prompt, completion, self.cache_n, self.prompt_n, self.predicted_n)

    @property
    def empty(self) -> bool:
        return (
            self.prompt_tokens is None
            and self.completion_tokens is None
            and self.cache_n is None
            and self.prompt_n is None
            and self.predicted_n is None
        )


# A token count outside this range is not one (and would not fit SQLite's INTEGER).
_MAX_COUNT = 1 << 53


def _int(value: object) -> int | None:
    if type(value) is not int:  # the common case first
        # bool is no count; a float such as 12.0 is one; anything else is not
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, float) and not value.is_integer():
            return None
        value = int(value)
    return value if 0 <= value <= _MAX_COUNT else None


def from_object(obj: object, nested: bool = True) -> Usage:
    """Usage from one decoded JSON object (a whole response or one SSE event)."""
    if not isinstance(obj, dict):
        return Usage()
    # Responses API and Anthropic's message_start nest the object that holds usage (one
    # level: a deeper nesting is no known shape, and must not recurse without end).
    get = obj.get
    if not nested:
        return _from_parts(get("usage"), get("timings"), None, None)
    return _from_parts(get("usage"), get("timings"), get("response"), get("message"))


def _from_parts(raw: object, timings: object, response: object, message: object) -> Usage:
    """Usage from the values of an object's ``usage``, ``timings``, ``response`` and
    ``message`` keys (None where absent); the nested ones first, the object's own last."""
    usage = Usage()
    for inner in (response, message):
        if isinstance(inner, dict) and ("usage" in inner or "timings" in inner):
            usage.merge(from_object(inner, nested=False))
    if isinstance(raw, dict):
        _read_usage(usage, raw)
    if isinstance(timings, dict):
        _read_timings(usage, timings)
    return usage


def _read_usage(usage: Usage, raw: dict[str, Any]) -> None:
    """The fields of a ``usage`` object that it holds, into ``usage`` (as merge would)."""
    get = raw.get
    prompt = _int(get("prompt_tokens"))
    if prompt is None:
        prompt = _int(get("input_tokens"))
        if prompt is not None:
            cached = _int(get("cache_read_input_tokens"))
            created = _int(get("cache_creation_input_tokens"))
            # Anthropic counts cached input apart from input_tokens.
            prompt += (cached or 0) + (created or 0)
    if prompt is not None:
        usage.prompt_tokens = prompt
    completion = _int(get("completion_tokens"))
    if completion is None:
        completion = _int(get("output_tokens"))
    if completion is not None:
        usage.completion_tokens = completion
    if "cache_n" in raw and (value := _int(raw["cache_n"])) is not None:
        usage.cache_n = value
    if "prompt_n" in raw and (value := _int(raw["prompt_n"])) is not None:
        usage.prompt_n = value


def _read_timings(usage: Usage, timings: dict[str, Any]) -> None:
    """llama.cpp's ``timings`` object, into ``usage`` (as merge would)."""
    if (value := _int(timings.get("cache_n"))) is not None:
        usage.cache_n = value
    if (value := _int(timings.get("prompt_n"))) is not None:
        usage.prompt_n = value
    if (value := _int(timings.get("predicted_n"))) is not None:
        usage.predicted_n = value


class _Answer(msgspec.Struct):
    """The top-level keys of an answer that can hold usage; msgspec skips the rest in C."""

    usage: Any = None
    timings: Any = None
    response: Any = None
    message: Any = None


_ANSWER = msgspec.json.Decoder(_Answer)
# Answers up to this size are decoded whole by msgspec (a chat completion: about 1 us);
# larger ones (embeddings) are searched for the two keys instead, which costs a byte search.
_DECODE_WHOLE = 64 * 1024


def from_json_bytes(body: bytes) -> Usage:
    """Usage from a whole non-streamed JSON body.

    A small body is decoded for its top-level ``usage``, ``timings``, ``response`` and
    ``message`` only. In a large one only the ``usage``/``timings`` objects are decoded
    (found by their key), so a large embeddings answer costs a byte search, not a full
    parse. Never raises.
    """
    if len(body) <= _DECODE_WHOLE:
        try:
            answer = _ANSWER.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass  # not one JSON object (or JSON msgspec refuses): the byte search below
        else:
            return _from_parts(answer.usage, answer.timings, answer.response, answer.message)
    usage = Usage()
    for marker, read in _READERS:
        at = body.rfind(marker)
        while at >= 0:
            value = _value_after(body, at + len(marker))
            if isinstance(value, dict):
                read(usage, value)
                break
            at = body.rfind(marker, 0, at)
    if usage.empty and body.lstrip()[:1] == b"{":
        # Nested shapes (Anthropic message, Responses) are rare when not streamed; parse.
        with contextlib.suppress(ValueError, RecursionError):
            usage = from_object(json.loads(body))
    return usage


_READERS = ((_MARKERS[0], _read_usage), (_MARKERS[1], _read_timings))


def _value_after(body: bytes, pos: int) -> Any:
    """Decode the JSON value after ``"key"`` at ``pos`` (skipping whitespace and ':')."""
    n = len(body)
    while pos < n and body[pos] in b" \t\r\n":
        pos += 1
    if pos >= n or body[pos] != ord(":"):
        return None
    pos += 1
    while pos < n and body[pos] in b" \t\r\n":
        pos += 1
    if pos >= n or body[pos] != ord("{"):
        return None
    try:
        text = body[pos:].decode("utf-8", errors="replace")
        value, _ = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return None
    return value


class SSEUsageScanner:
    """Feeds on the relayed bytes of an event stream, chunk by chunk, split anywhere.

    Only ``data:`` lines that mention ``usage`` or ``timings`` are decoded. Never raises.
    """

    def __init__(self) -> None:
        self.usage = Usage()
        self._partial = bytearray()
        self._skipping = False  # inside an over-long line

    def feed(self, chunk: bytes) -> None:
        # Per chunk, not per line: the complete lines of a chunk are searched for the two
        # markers at C speed, and split into lines only when one is there.
        # find(), not `in`: CPython 3.11 first tries a bytes `in` operand as an integer and
        # formats a TypeError it then drops, 0.45 us a test; find() takes 0.2 us.
        if (
            not self._partial
            and not self._skipping
            and chunk[-1:] == b"\n"
            and chunk.find(b'"usage"') < 0
            and chunk.find(b'"timings"') < 0
        ):
            return  # whole lines, none with a marker: a token event's usual chunk
        last = chunk.rfind(b"\n")
        if last < 0:
            if not self._skipping:
                if len(self._partial) + len(chunk) > MAX_SSE_LINE:
                    self._partial.clear()
                    self._skipping = True
                else:
                    self._partial += chunk
            return
        if self._skipping:  # the rest of an over-long line ends at the first newline
            complete = chunk[chunk.find(b"\n") + 1 : last]
            self._skipping = False
        elif self._partial:
            self._partial += chunk[:last]
            complete = bytes(self._partial)
            self._partial.clear()
        else:
            complete = chunk[:last]
        tail = chunk[last + 1 :]
        if len(tail) > MAX_SSE_LINE:
            self._skipping = True
        else:
            self._partial += tail
        if complete.find(b'"usage"') >= 0 or complete.find(b'"timings"') >= 0:
            self._scan(complete)

    def _scan(self, complete: bytes) -> None:
        """Decode only the lines that hold a marker, in stream order: a burst of hundreds of
        events then costs a few byte searches, not a Python loop over every line."""
        spans: dict[int, int] = {}
        for marker in _MARKERS:
            at = complete.find(marker)
            while at >= 0:
                start = complete.rfind(b"\n", 0, at) + 1
                end = complete.find(b"\n", at)
                end = len(complete) if end < 0 else end
                spans[start] = end
                at = complete.find(marker, end)
        for start in sorted(spans):
            self._line(complete[start : spans[start]])

    def finish(self) -> Usage:
        if self._partial and not self._skipping:
            self._line(bytes(self._partial))
        self._partial.clear()
        return self.usage

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        if line.find(b'"usage"') < 0 and line.find(b'"timings"') < 0:
            return
        # As a whole answer is read (msgspec, only the keys that can hold usage): 2 us for
        # llama.cpp's last event, where the standard library's whole parse took 7 us.
        self.usage.merge(from_json_bytes(line[5:]))
