"""The model field of request bodies: read by msgspec (with a standard-library fallback) and
renamed by splicing bytes; property-tested against ``json.loads``."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_manager.errors import BadRequest
from llm_manager.gateway import model_field
from llm_manager.gateway.model_field import (
    _only_model_span,
    _top_level_model_spans,
    model_spans,
    read_fields,
    rename_model,
)

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _dump(pairs: list[tuple[str, Any]], ascii_only: bool, spaced: bool) -> bytes:
    """A JSON object from key/value pairs, duplicates kept, in one of several spellings."""
    sep = ", " if spaced else ","
    colon = " : " if spaced else ":"
    items = [
        json.dumps(k, ensure_ascii=ascii_only) + colon + json.dumps(v, ensure_ascii=ascii_only)
        for k, v in pairs
    ]
    return ("{" + ("\n " if spaced else "") + sep.join(items) + "}").encode()


@st.composite
def bodies_with_models(draw: st.DrawFn) -> tuple[list[tuple[str, Any]], int, bytes]:
    """A JSON object of random pairs with "model" once or more (duplicates: the last wins),
    in one of several spellings: (its pairs, how many "model" keys, the body)."""
    pairs = draw(st.lists(st.tuples(st.text(max_size=8), JSON_VALUES), max_size=6))
    pairs = [p for p in pairs if p[0] != "model"]
    models = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3))
    at = draw(st.integers(min_value=0, max_value=6))
    for i, name in enumerate(models):
        pairs.insert(min(at + i, len(pairs)), ("model", name))
    return pairs, len(models), _dump(pairs, draw(st.booleans()), draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(case=bodies_with_models(), new=st.text(min_size=1, max_size=12))
def test_renaming_bytes_equals_renaming_the_decoded_object(
    case: tuple[list[tuple[str, Any]], int, bytes], new: str
) -> None:
    _, models, body = case
    fields = read_fields(body)
    assert fields.model == json.loads(body)["model"]
    renamed = rename_model(body, new)
    expected = json.loads(body)
    expected["model"] = new
    assert json.loads(renamed) == expected
    # Every byte outside the model values is unchanged.
    spans = model_spans(body)
    assert len(spans) == models
    renamed_spans = model_spans(renamed)
    value = json.dumps(new).encode()
    assert [renamed[a:b] for a, b in renamed_spans] == [value] * len(spans)
    assert _outside(renamed, renamed_spans) == _outside(body, spans)


def _outside(body: bytes, spans: list[tuple[int, int]]) -> list[bytes]:
    """The pieces of ``body`` between (and around) the spans."""
    starts = [0] + [end for _, end in spans]
    ends = [start for start, _ in spans] + [len(body)]
    return [body[a:b] for a, b in zip(starts, ends, strict=True)]


def test_numbers_and_escapes_reach_the_engine_unchanged() -> None:
    body = (
        b'{"temperature": 1e400, "n": 12345678901234567890123, "model": "q", "x": "\\u00e9\\ud800"}'
    )
    renamed = rename_model(body, "qwen-7b")
    assert renamed == body.replace(b'"q"', b'"qwen-7b"')
    assert read_fields(body).model == "q"  # the lone surrogate: stdlib fallback


def test_only_top_level_model_keys_are_renamed() -> None:
    body = b'{"messages": [{"model": "inner"}], "meta": {"model": "x"}, "mod\\u0065l": "q"}'
    assert rename_model(body, "new") == body.replace(b'"q"', b'"new"')


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": "hi"}], "model": "a"}',
        b'{"model" :\t"a\\\\"}',  # spaced, a value ending in an escaped backslash
        b'{"x": "a \\"model\\": b", "model": "a"}',  # "model" quoted inside a string
        b'{"x": "\\\\", "model": "a"}',  # an escaped backslash just before the key
        b'{"x": "model", "y": ["model"], "model": "a"}',  # "model" as values
        b'{"say \\"model": 1, "model": "a"}',  # a key ending in \"model: not "model"
        b'{"a\\\\\\"model": 1, "model": "a"}',  # the same after an escaped backslash
        b'{"x": "\\u00e9", "model": "a"}',  # other escapes do not matter
    ],
)
def test_the_only_model_key_is_found_without_the_structure_scan(body: bytes) -> None:
    assert read_fields(body).model in ("a", "a\\")  # the second: an escaped backslash
    assert _only_model_span(body) == model_spans(body)[0]
    expected = json.loads(body)
    expected["model"] = "new"
    assert json.loads(rename_model(body, "new")) == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"meta": {"model": "x"}, "mod\\u0065l": "q"}',  # escaped letters: could be a key
        b'{"meta": {"model": "x"}, "model": "q"}',  # two keys: which is top-level takes a scan
        b'{"model": 5, "model": "a"}',  # duplicates
        b'{"x": "\\u006D", "model": "q"}',  # an escaped letter anywhere (upper-case hex)
        b'{"x": "ends in \\u006',  # cut short at the escape (not valid; no index error)
    ],
)
def test_the_structure_scan_decides_when_the_key_may_not_be_the_only_one(body: bytes) -> None:
    assert _only_model_span(body) is None


@settings(max_examples=300, deadline=None)
@given(case=bodies_with_models())
def test_the_top_level_walk_finds_what_the_scan_finds_or_hands_over(
    case: tuple[list[tuple[str, Any]], int, bytes],
) -> None:
    """The walk over msgspec's pairs gives the scan's spans, or None (never other spans);
    with every key once it always gives them."""
    pairs, _, body = case
    walked = _top_level_model_spans(body)
    keys = [k for k, _ in pairs]
    if len(set(keys)) == len(keys):
        assert walked == model_spans(body)
    else:
        assert walked is None  # a key twice: the scan decides


@pytest.mark.parametrize(
    ("body", "values"),
    [
        (b'{"messages": [{"model": "inner"}], "model": "a"}', [b'"a"']),
        (b'{\n "model" :\t"a" ,"n": 12}', [b'"a"']),  # spacing
        (b'{"n": 1, "model": "a"}', [b'"a"']),  # a number, then the key
        (b'{"mod\\u0065l": "a", "x": {"model": "b"}}', [b'"a"']),  # an escaped spelling
        (b'{"model": 5, "x": "model"}', []),  # not a string: left alone
        (b'{"x": "a \\"model\\": \\"b\\"", "model": "c"}', [b'"c"']),
        (b'  {"model": "a"}  ', [b'"a"']),  # whitespace around the object
    ],
)
def test_the_top_level_walk_on_bodies_that_matter(body: bytes, values: list[bytes]) -> None:
    spans = model_spans(body)
    assert [body[a:b] for a, b in spans] == values
    assert _top_level_model_spans(body) == spans


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "model": "b"}',  # a key twice: one entry for two pairs
        b'{"x": 1, "x": 2, "model": "a"}',
        b'{"model": "\\ud800"}',  # a lone surrogate: msgspec refuses it, the stdlib not
        b'{"model": NaN}',
    ],
)
def test_the_top_level_walk_hands_over_what_it_cannot_tell(body: bytes) -> None:
    assert _top_level_model_spans(body) is None


def test_a_large_body_is_renamed_by_the_walk_and_a_doubled_key_by_the_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    history = [{"role": "user", "content": f'say "model": {i} \\u006d'} for i in range(200)]
    body = json.dumps({"messages": history, "model": "alias"}).encode()
    assert len(body) >= model_field._WALK_FROM
    scans: list[bytes] = []
    scan = model_field.model_spans

    def counted(b: bytes) -> list[tuple[int, int]]:
        scans.append(b)
        return scan(b)

    monkeypatch.setattr(model_field, "model_spans", counted)
    renamed = rename_model(body, "real")
    assert renamed == body.replace(b'"model": "alias"', b'"model": "real"')
    assert scans == []  # the walk found it
    doubled = body[:-1] + b', "model": "alias"}'
    renamed = rename_model(doubled, "real")
    assert renamed == doubled.replace(b'"model": "alias"', b'"model": "real"')
    assert renamed.count(b'"model": "real"') == 2 and len(scans) == 1


def test_a_model_that_is_not_a_string_is_left_alone() -> None:
    body = b'{"model": 5, "model": "a"}'
    assert model_spans(body) == [(22, 25)]  # only "a"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a":' * 3000 + b"1" + b"}" * 3000, "nested too deeply"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": "a",}', "invalid JSON"),
        (b"{" * 100_000, "invalid JSON"),
    ],
)
def test_bad_bodies_are_clear_400s(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        read_fields(body)


def test_stream_flag() -> None:
    assert read_fields(b'{"model": "a", "stream": true}').stream is True
    assert read_fields(b'{"model": "a", "stream": "yes"}').stream is False
    assert read_fields(b'{"stream": true}').has_model is False
    assert read_fields(b'{"model": null}').has_model is True


@pytest.mark.parametrize(
    ("body", "model", "stream"),
    [
        (b'{"model": "a", "model": "b", "stream": true}', "b", True),  # a key twice: the last
        (b'{"stream": true, "model": "a", "stream": false}', "a", False),
        (b'{"n": 1e400, "model": "a"}', "a", False),  # beyond simdjson: json.loads reads it
        (b'{"seed": 123456789012345678901234567890, "model": "a"}', "a", False),
        (b'{"x": "\\ud800", "model": "a"}', "a", False),  # a lone surrogate escape
        (b'{"t": NaN, "model": "a", "stream": true}', "a", True),
        (b'{"mod\\u0065l": "a"}', "a", False),  # an escaped spelling of the key
    ],
)
def test_fields_read_as_json_loads_reads_them(body: bytes, model: str, stream: bool) -> None:
    fields = read_fields(body)
    assert (fields.model, fields.has_model, fields.stream) == (model, True, stream)


def test_a_model_that_is_an_object_or_a_list_is_read_out_of_the_parser() -> None:
    """Not a string (the caller answers 400), copied out: the next body parses at once."""
    assert read_fields(b'{"model": {"a": [1]}}').model == {"a": [1]}
    assert read_fields(b'{"model": [1, {"b": 2}]}').model == [1, {"b": 2}]
    assert read_fields(b'{"model": "next"}').model == "next"


def test_invalid_utf8_is_a_clear_400() -> None:
    with pytest.raises(BadRequest, match="invalid JSON"):
        read_fields(b'{"model": "a", "x": "\xff"}')


def test_a_large_body_gets_a_parser_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread's parser is not grown by a large body: that one gets a parser of its own."""
    read_fields(b'{"model": "a"}')
    kept = model_field._PARSERS.parser
    made: list[object] = []
    real = model_field.simdjson.Parser

    def parser() -> object:
        made.append(real())
        return made[-1]

    monkeypatch.setattr(model_field.simdjson, "Parser", parser)
    monkeypatch.setattr(model_field, "_KEPT_PARSER_MAX", 64)
    big = json.dumps({"messages": ["x" * 200], "model": "big"}).encode()
    assert read_fields(big).model == "big"
    assert len(made) == 1 and made[0] is not kept
    assert read_fields(b'{"model": "b"}').model == "b"
    assert len(made) == 1 and model_field._PARSERS.parser is kept


def test_threads_read_bodies_at_once() -> None:
    """A parser reads one body at a time: each thread has its own."""
    bodies = [json.dumps({"model": f"m{i}", "messages": ["x" * i]}).encode() for i in range(400)]
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda b: read_fields(b).model, bodies))
    assert models == [f"m{i}" for i in range(400)]
