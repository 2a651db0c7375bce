"""Unit tests of token-usage extraction: whole JSON bodies and SSE split anywhere."""

from __future__ import annotations

import json

import pytest

from llm_manager.gateway.usage import (
    MAX_SSE_LINE,
    SSEUsageScanner,
    Usage,
    from_json_bytes,
    from_object,
)


def sse(*events: object, event_names: bool = False) -> bytes:
    out = b""
    for e in events:
        if event_names and isinstance(e, dict):
            out += f"event: {e.get('type', 'x')}\n".encode()
        out += b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
    return out


OPENAI_STREAM = sse(
    {"choices": [{"delta": {"content": "a"}}]},
    {"choices": [{"delta": {"content": "b"}}]},
    {
        "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
        "timings": {"cache_n": 3, "prompt_n": 9, "predicted_n": 2},
    },
    b"[DONE]",
)
ANTHROPIC_STREAM = sse(
    {"type": "message_start", "message": {"usage": {"input_tokens": 20, "output_tokens": 1}}},
    {"type": "content_block_delta", "delta": {"text": "usage"}},
    {"type": "message_delta", "usage": {"output_tokens": 15}},
    {"type": "message_stop"},
    event_names=True,
)
RESPONSES_STREAM = sse(
    {"type": "response.output_text.delta", "delta": "hi"},
    {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 30, "output_tokens": 6, "total_tokens": 36}},
    },
    event_names=True,
)


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (OPENAI_STREAM, Usage(12, 2, 3, 9, 2)),
        (ANTHROPIC_STREAM, Usage(20, 15)),
        (RESPONSES_STREAM, Usage(30, 6)),
    ],
)
def test_stream_split_at_every_point(stream: bytes, expected: Usage) -> None:
    for cut in range(len(stream) + 1):
        scanner = SSEUsageScanner()
        scanner.feed(stream[:cut])
        scanner.feed(stream[cut:])
        assert scanner.finish() == expected, cut


def test_stream_fed_byte_by_byte_and_crlf() -> None:
    scanner = SSEUsageScanner()
    for b in OPENAI_STREAM.replace(b"\n", b"\r\n"):
        scanner.feed(bytes([b]))
    assert scanner.finish() == Usage(12, 2, 3, 9, 2)


def test_last_event_without_trailing_newline() -> None:
    scanner = SSEUsageScanner()
    scanner.feed(b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 2}}')
    assert scanner.finish() == Usage(1, 2)


def test_garbage_and_overlong_lines_never_raise() -> None:
    scanner = SSEUsageScanner()
    scanner.feed(b'data: {"usage": broken\n\n')
    scanner.feed(b"data: " + b'"usage"' + b"x" * (MAX_SSE_LINE + 10))
    scanner.feed(b"more of the same long line\n")
    scanner.feed(b"\xff\xfe\x00 binary\n")
    scanner.feed(b'data: {"usage": {"prompt_tokens": 5, "completion_tokens": 1}}\n\n')
    assert scanner.finish() == Usage(5, 1)


def test_no_usage_gives_empty() -> None:
    scanner = SSEUsageScanner()
    scanner.feed(sse({"choices": []}, b"[DONE]"))
    assert scanner.finish().empty


def test_json_body_openai_llama_and_usage_in_content() -> None:
    body = json.dumps(
        {
            "choices": [{"message": {"content": 'the word "usage": {"prompt_tokens": 999}'}}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 5, "cache_n": 1, "prompt_n": 3},
            "timings": {"predicted_n": 5},
        }
    ).encode()
    assert from_json_bytes(body) == Usage(4, 5, 1, 3, 5)


def test_json_body_nested_and_anthropic_cache() -> None:
    body = json.dumps(
        {
            "type": "message",
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 5,
                "cache_creation_input_tokens": 2,
                "output_tokens": 3,
            },
        }
    ).encode()
    assert from_json_bytes(body) == Usage(17, 3)
    responses = json.dumps({"response": {"usage": {"input_tokens": 2, "output_tokens": 1}}})
    assert from_json_bytes(responses.encode()) == Usage(2, 1)


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1,2]", b'{"usage": 5}', b'{"usage": {"prompt_tokens": "x"}}', b"\xff"],
)
def test_json_body_odd_inputs(body: bytes) -> None:
    usage = from_json_bytes(body)
    assert usage.prompt_tokens is None and usage.completion_tokens is None


def test_from_object_rejects_non_integers() -> None:
    assert from_object({"usage": {"prompt_tokens": True, "completion_tokens": 2.0}}) == Usage(
        None, 2
    )
    assert from_object([1, 2]).empty


def test_stream_fed_event_by_event_as_tokens_arrive() -> None:
    # One chunk per event, each ending its lines: the scanner's quick path for token events.
    scanner = SSEUsageScanner()
    for event in OPENAI_STREAM.split(b"\n\n")[:-1]:
        scanner.feed(event + b"\n\n")
    assert scanner.finish() == Usage(12, 2, 3, 9, 2)


def test_overlong_line_ended_by_a_whole_line_chunk() -> None:
    # The rest of an over-long line arrives as a chunk of whole lines without a marker:
    # the scanner must leave the over-long line there, not take the next event for its rest.
    scanner = SSEUsageScanner()
    scanner.feed(b"data: " + b"x" * (MAX_SSE_LINE + 10))
    scanner.feed(b"the rest of the long line\n")
    scanner.feed(b'data: {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n')
    assert scanner.finish() == Usage(7, 3)
