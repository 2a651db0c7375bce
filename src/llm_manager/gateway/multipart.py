"""The ``model`` field of a ``multipart/form-data`` body, found without copying the body.

The OpenAI SDK sends audio transcriptions, translations and image edits as multipart forms
with the model in a form field. The body is already in memory (the relay reads it once);
this module finds the boundary delimiters with ``bytes.find`` (memchr speed, no copies of
the file parts), reads the few header lines of each part, and returns the value of the
first part whose ``Content-Disposition`` says ``name="model"`` (and carries no filename),
with its byte span so that an alias can be replaced by the configured name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llm_manager.errors import BadRequest

_BOUNDARY = re.compile(rb';\s*boundary=(?:"([^"]{1,200})"|([^;,\s]{1,200}))', re.IGNORECASE)
_DISPOSITION = re.compile(rb"^content-disposition:(.*)$", re.IGNORECASE | re.MULTILINE)
_NAME_MODEL = re.compile(rb';\s*name=(?:"model"|model)\s*(?:;|$)', re.IGNORECASE)
_FILENAME = re.compile(rb";\s*filename\*?=", re.IGNORECASE)
_HEADERS_MAX = 16 * 1024  # a part's header block longer than this is not looked into


@dataclass(frozen=True, slots=True)
class FormModel:
    name: str
    start: int  # the value's byte span in the body
    end: int


def is_multipart(content_type: bytes) -> bool:
    return content_type[:19].lower() == b"multipart/form-data"


def boundary_of(content_type: bytes) -> bytes | None:
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    return found.group(1) or found.group(2)


def form_model(body: bytes, content_type: bytes) -> FormModel | None:
    """The ``model`` form field of a multipart body, or None when the form has none.

    Raises BadRequest for a multipart Content-Type without a boundary, or a ``model``
    field that is empty or not UTF-8.
    """
    boundary = boundary_of(content_type)
    if boundary is None:
        raise BadRequest("multipart/form-data without a boundary in the Content-Type")
    delimiter = b"--" + boundary
    size = len(body)
    # The first delimiter may start the body; every later one follows a CRLF.
    at = 0 if body.startswith(delimiter) else body.find(b"\r\n" + delimiter)
    if at < 0:
        return None
    if at > 0:
        at += 2
    following = b"\r\n" + delimiter
    while True:
        at += len(delimiter)
        if body.startswith(b"--", at):  # the close delimiter
            return None
        line_end = body.find(b"\r\n", at, at + 1024)
        if line_end < 0:
            return None
        headers_start = line_end + 2
        headers_end = body.find(b"\r\n\r\n", headers_start - 2, headers_start + _HEADERS_MAX)
        if headers_end < 0:
            return None
        content = headers_end + 4
        next_at = body.find(following, content)
        if next_at < 0:
            next_at = size  # cut short: the value runs to the end
        headers = body[headers_start:headers_end]  # a few hundred bytes at most
        if _is_model_part(headers):
            try:
                name = body[content:next_at].decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("the 'model' form field is not UTF-8") from None
            if not name.strip():
                raise BadRequest("'model' must be a non-empty string")
            return FormModel(name, content, next_at)
        if next_at >= size:
            return None
        at = next_at + 2


def _is_model_part(headers: bytes) -> bool:
    for found in _DISPOSITION.finditer(headers):
        value = found.group(1).rstrip(b"\r")
        if _NAME_MODEL.search(value) and not _FILENAME.search(value):
            return True
    return False


def rename_form_model(body: bytes | bytearray, field: FormModel, name: str) -> bytes:
    """The body with the ``model`` field's value replaced by ``name``; every other byte as
    the client sent it. A large body (read into a bytearray, see forward.py) is changed in
    place: the bytes after the value move, and the buffer is not copied."""
    if isinstance(body, bytearray):
        body[field.start : field.end] = name.encode()
        return body  # type: ignore[return-value]  # bytes-like, as forward.py uses it
    view = memoryview(body)
    return b"".join((view[: field.start], name.encode(), view[field.end :]))
