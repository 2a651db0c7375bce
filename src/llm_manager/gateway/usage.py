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

_DECODER = json.JSONDecoder()
_MARKERS = (b'"usage"', b'"timings"')
MAX_SSE_LINE = 1 << 20  # a data line longer than this cannot be scanned; it is skipped
# Spelled out rather than dataclasses.fields(): merging runs for every relayed answer.
_FIELD_NAMES = ("prompt_tokens", "completion_tokens", "cache_n", "prompt_n", "predicted_n")


@dataclass
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cache_n: int | None = None
    prompt_n: int | None = None
    predicted_n: int | None = None

    def merge(self, other: Usage) -> None:
        """Take every field the other one knows (later events refine earlier ones)."""
        for f in _FIELD_NAMES:
            value = getattr(other, f)
            if value is not None:
                setattr(self, f, value)

    def completed(self) -> Usage:
        """Fill token counts from llama.cpp's timings when no ``usage`` came (its streams
        carry ``timings`` only, unless the client asked for ``include_usage``)."""
        out = Usage(**{f: getattr(self, f) for f in _FIELD_NAMES})
        if out.prompt_tokens is None and out.prompt_n is not None:
            out.prompt_tokens = out.prompt_n + (out.cache_n or 0)
        if out.completion_tokens is None and out.predicted_n is not None:
            out.completion_tokens = out.predicted_n
        return out

    @property
    def empty(self) -> bool:
        return all(getattr(self, f) is None for f in _FIELD_NAMES)


# A token count outside this range is not one (and would not fit SQLite's INTEGER).
_MAX_COUNT = 1 << 53


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= _MAX_COUNT:
        return value
    return None


def from_object(obj: object, nested: bool = True) -> Usage:
    """Usage from one decoded JSON object (a whole response or one SSE event)."""
    usage = Usage()
    if not isinstance(obj, dict):
        return usage
    # Responses API and Anthropic's message_start nest the object that holds usage (one
    # level: a deeper nesting is no known shape, and must not recurse without end).
    for key in ("response", "message") if nested else ():
        inner = obj.get(key)
        if isinstance(inner, dict) and ("usage" in inner or "timings" in inner):
            usage.merge(from_object(inner, nested=False))
    raw = obj.get("usage")
    if isinstance(raw, dict):
        prompt = _int(raw.get("prompt_tokens"))
        if prompt is None:
            prompt = _int(raw.get("input_tokens"))
            cached = _int(raw.get("cache_read_input_tokens"))
            created = _int(raw.get("cache_creation_input_tokens"))
            if prompt is not None and (cached or created):
                # Anthropic counts cached input apart from input_tokens.
                prompt += (cached or 0) + (created or 0)
        completion = _int(raw.get("completion_tokens"))
        if completion is None:
            completion = _int(raw.get("output_tokens"))
        usage.merge(
            Usage(
                prompt_tokens=prompt,
                completion_tokens=completion,
                cache_n=_int(raw.get("cache_n")),
                prompt_n=_int(raw.get("prompt_n")),
            )
        )
    timings = obj.get("timings")
    if isinstance(timings, dict):
        usage.merge(
            Usage(
                cache_n=_int(timings.get("cache_n")),
                prompt_n=_int(timings.get("prompt_n")),
                predicted_n=_int(timings.get("predicted_n")),
            )
        )
    return usage


def from_json_bytes(body: bytes) -> Usage:
    """Usage from a whole non-streamed JSON body.

    Only the ``usage``/``timings`` objects are decoded (found by their key), so a large
    embeddings answer costs a byte search, not a full parse.
    """
    usage = Usage()
    for marker in _MARKERS:
        at = body.rfind(marker)
        while at >= 0:
            value = _value_after(body, at + len(marker))
            if isinstance(value, dict):
                usage.merge(from_object({marker.strip(b'"').decode(): value}))
                break
            at = body.rfind(marker, 0, at)
    if usage.empty and body.lstrip()[:1] == b"{":
        # Nested shapes (Anthropic message, Responses) are rare when not streamed; parse.
        with contextlib.suppress(ValueError, RecursionError):
            usage = from_object(json.loads(body))
    return usage


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
        if b'"usage"' in complete or b'"timings"' in complete:
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
        if b'"usage"' not in line and b'"timings"' not in line:
            return
        try:
            obj = json.loads(line[5:])
        except (ValueError, RecursionError):  # too deep: not a usage event we know
            return
        self.usage.merge(from_object(obj))
