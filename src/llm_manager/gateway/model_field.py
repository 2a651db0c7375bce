"""The ``model`` (and ``stream``) of a JSON request body, read and renamed without
re-serialising the body.

Reading: simdjson validates the whole body and its two fields are read from the parsed
document, which is never turned into Python objects (0.19 against msgspec's 0.31 ms for a
1 MiB chat history; docs/performance.md). Bodies it refuses but the standard library
accepts (lone surrogate escapes, ``NaN``, numbers beyond 64 bits) and bodies with either key
twice (simdjson reads the first, ``json.loads`` the last) fall back to ``json.loads``;
nesting too deep for either is a clear 400, never a RecursionError.

Renaming (a request that names the model by an alias or a prefix): only the bytes of the
top-level ``model`` string values change; every other byte reaches the engine as the
client sent it (numbers such as ``1e400``, duplicate keys, escapes, spacing).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass

import msgspec
import simdjson

from llm_manager.errors import BadRequest

# A simdjson parser keeps buffers for the largest body it has read, about twice its size
# (RSS +2.0 MiB after a 1 MiB body): a body from this size on gets a parser of its own,
# dropped with it (0.227 against 0.185 ms per MiB), so the kept one holds at most ~4 MiB.
_KEPT_PARSER_MAX = 2 * 1024 * 1024
_PARSERS = threading.local()  # one parser per thread: a parser reads one body at a time
_ABSENT = object()


@dataclass(frozen=True, slots=True)
class BodyFields:
    model: object  # the value of "model" (any JSON type); see has_model
    has_model: bool  # whether the object has a "model" key at all
    stream: bool  # "stream": true


def read_fields(body: bytes) -> BodyFields:
    """The ``model`` and ``stream`` of a body that starts like a JSON object or array.

    Raises BadRequest for invalid JSON or a body that is not an object.
    """
    if len(body) < _KEPT_PARSER_MAX:
        parser = getattr(_PARSERS, "parser", None)
        if parser is None:
            parser = _PARSERS.parser = simdjson.Parser()
    else:
        parser = simdjson.Parser()
    try:
        document = parser.parse(body)
    except (ValueError, RuntimeError):  # invalid, or beyond simdjson: the stdlib tells
        return _read_fields_stdlib(body)
    if not isinstance(document, simdjson.Object):
        del document  # the parser reads no other body while its document lives
        raise BadRequest("the request body must be a JSON object")
    keys = list(document.keys())  # every key as written, a repeated one each time
    if keys.count("model") > 1 or keys.count("stream") > 1:
        del document
        return _read_fields_stdlib(body)  # a key twice: the last one counts, as in json.loads
    # Indexing only keys that are there: get() of an absent key cost 1.8 us (an exception
    # inside), the whole read of a small body about 0.7.
    model = document["model"] if "model" in keys else _ABSENT
    stream = "stream" in keys and document["stream"] is True
    if isinstance(model, simdjson.Object):  # not a string (a 400 for the caller), copied
        model = model.as_dict()  # out of the parser, which reads the next body over it
    elif isinstance(model, simdjson.Array):
        model = model.as_list()
    del document
    return BodyFields(model, model is not _ABSENT, stream)


def _read_fields_stdlib(body: bytes) -> BodyFields:
    try:
        payload: object = json.loads(body)
    except RecursionError:
        raise BadRequest("the request body's JSON is nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"invalid JSON in the request body: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    has = "model" in payload
    return BodyFields(payload.get("model"), has, payload.get("stream") is True)


# The characters that shape a JSON text: string quotes and brackets.
_STRUCTURE = re.compile(rb'["{}\[\]]')
_SPACE = b" \t\r\n"


def model_spans(body: bytes) -> list[tuple[int, int]]:
    """Byte spans of every string value of a top-level ``model`` key, in a body that is
    known to be a valid JSON object.

    Strings are skipped with ``bytes.find`` (memchr speed) and the text between them with
    one regular-expression search, so a 1 MiB chat history costs a few thousand steps,
    not a million (measured: faster than decoding and re-encoding the body).
    """
    spans: list[tuple[int, int]] = []
    search = _STRUCTURE.search
    size = len(body)
    depth = 0
    pos = 0
    colon_end = -1  # set while the last key seen was "model" (and its colon)
    while (found := search(body, pos)) is not None:
        at = found.start()
        char = body[at]
        if char != 0x22:  # a bracket
            depth += 1 if char in (0x7B, 0x5B) else -1  # { [  or  } ]
            colon_end = -1
            pos = at + 1
            continue
        end = _string_end(body, at)
        pos = end
        if depth != 1:
            continue
        if colon_end >= 0:
            after_colon, colon_end = colon_end, -1
            if not body[after_colon:at].strip(_SPACE):
                spans.append((at, end))  # the string right after "model":
                continue
        colon = end
        while colon < size and body[colon] in _SPACE:
            colon += 1
        if colon < size and body[colon] == 0x3A and _is_model_key(body[at:end]):  # ':'
            colon_end = colon + 1
    return spans


def _string_end(body: bytes, start: int) -> int:
    """The index after the closing quote of the string opening at ``start``."""
    at = start + 1
    while True:
        at = body.find(b'"', at)
        if at < 0:
            raise ValueError("unterminated string")  # not reached: the body was validated
        if body[at - 1] != 0x5C or not _escaped(body, at):  # most quotes: no call
            return at + 1
        at += 1


def _escaped(body: bytes, at: int) -> bool:
    """Whether the quote at ``at`` is escaped: an odd run of backslashes before it."""
    before = at
    while before > 0 and body[before - 1] == 0x5C:
        before -= 1
    return bool((at - before) % 2)


def _is_model_key(token: bytes) -> bool:
    if token == b'"model"':
        return True
    if b"\\" not in token or len(token) > 64:
        return False
    try:
        return bool(json.loads(token) == "model")
    except ValueError:
        return False


def _next_non_space(body: bytes, at: int) -> int:
    while at < len(body) and body[at] in _SPACE:
        at += 1
    return at


# A "model" key can be spelled with escapes only through \u escapes of its letters.
_ESCAPE_6X = b"\\u006"
_MODEL_LETTERS = b"45cdfCDF"  # \u0064 d, \u0065 e, \u006c l, \u006d m, \u006f o
_MODEL_KEY = b'"model"'


def _escapes_a_model_letter(body: bytes) -> bool:
    at = body.find(_ESCAPE_6X)
    while at >= 0:
        if body[at + 5 : at + 6] in _MODEL_LETTERS:  # b"" (the end) is in it: True, too
            return True
        at = body.find(_ESCAPE_6X, at + 5)
    return False


def _only_model_span(body: bytes) -> tuple[int, int] | None:
    """The span of the string value of the body's only ``"model":`` key, when the body
    spells no letter of it with an escape and has exactly one such key with a string
    value; None otherwise (model_spans then scans the whole structure).

    A quote inside a JSON string is escaped, so an unescaped quote followed by
    ``model"`` opens the string token ``"model"``, and one followed by a colon is a key.
    With no escaped spelling possible, that is every "model" key of the body at any depth;
    the top-level one is known to exist (the caller read it), so a single one is it. Found
    with ``bytes.find`` alone: 2.3x faster than the structure scan on a 1 MiB chat history
    and 2.6x on a 1 KiB request (docs/performance.md).
    """
    if _escapes_a_model_letter(body):
        return None
    found: tuple[int, int] | None = None
    size = len(body)
    at = body.find(_MODEL_KEY)
    while at >= 0:
        end = at + len(_MODEL_KEY)
        colon = _next_non_space(body, end)
        if not _escaped(body, at) and colon < size and body[colon] == 0x3A:  # ':': a key
            if found is not None:
                return None  # more than one: which is the top-level one takes the scan
            value = _next_non_space(body, colon + 1)
            if value >= size or body[value] != 0x22:
                return None  # not a string
            found = (value, _string_end(body, value))
        at = body.find(_MODEL_KEY, end)
    return found


# From this size on the top-level walk (_top_level_model_spans) finds the model faster than
# the quick key find; below it, the walk's fixed cost is more (measured on chat histories of
# 2-32 KiB, in-process: 3.9 against 2.9 us at 2 KiB, 4.3 against 4.5 at 4 KiB).
_WALK_FROM = 4096
_PAIRS = msgspec.json.Decoder(dict[str, msgspec.Raw])


def _top_level_model_spans(body: bytes) -> list[tuple[int, int]] | None:
    """The spans of the top-level ``model`` string values, found by walking the top-level
    pairs that msgspec reads (each value a ``Raw``, its bytes as sent, skipped in C); None
    when the walk cannot tell (model_spans then scans the whole structure).

    The walk starts at the object's real ``{`` and checks each token where it must stand:
    a key's string, the colon, a value whose bytes equal the next pair's ``Raw`` and are
    followed by a comma or the closing brace. A JSON value is delimited by its own bytes, so
    each step lands on the body's next real token, and a walk that ends on the closing
    brace has read the body's pairs themselves. msgspec keeps one entry per key: a body
    with a key twice has more pairs than entries, and its walk fails. So a finished walk
    knows which value is the top-level ``model``'s, whatever the spelling of its key, with
    two passes in C over the body (the decode and the byte comparisons) instead of the
    searches: 0.48 against 1.0 ms for a 1 MiB chat history (docs/performance.md).
    """
    try:
        pairs = _PAIRS.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        return None  # msgspec refuses what the standard library accepts (lone surrogates)
    size = len(body)
    at = _next_non_space(body, 0)
    if at >= size or body[at] != 0x7B:  # {
        return None
    at = _next_non_space(body, at + 1)
    spans: list[tuple[int, int]] = []
    for index, (key, raw) in enumerate(pairs.items()):
        if index:
            if at >= size or body[at] != 0x2C:  # ,
                return None
            at = _next_non_space(body, at + 1)
        if at >= size or body[at] != 0x22:  # a key's opening quote
            return None
        at = _next_non_space(body, _string_end(body, at))
        if at >= size or body[at] != 0x3A:  # :
            return None
        at = _next_non_space(body, at + 1)
        value = bytes(raw)
        if not body.startswith(value, at):
            return None
        end = at + len(value)
        if key == "model" and value[:1] == b'"':
            spans.append((at, end))
        at = _next_non_space(body, end)
    if at >= size or body[at] != 0x7D:  # }: the walk read every pair
        return None
    return spans


def rename_model(body: bytes, name: str) -> bytes:
    """The body with every top-level ``model`` string value replaced by ``name``; the body
    is valid JSON whose top-level ``model`` is a string (as read_fields found it)."""
    spans: list[tuple[int, int]] | None
    if len(body) >= _WALK_FROM:
        spans = _top_level_model_spans(body)
    else:
        only = _only_model_span(body)
        spans = [only] if only is not None else None
    if spans is None:
        spans = model_spans(body)
    if not spans:
        return body
    value = json.dumps(name).encode()
    view = memoryview(body)  # slices without copies: the join copies each byte once
    parts: list[bytes | memoryview] = []
    at = 0
    for start, end in spans:
        parts += (view[at:start], value)
        at = end
    parts.append(view[at:])
    return b"".join(parts)
