"""How serious a model's log line is, read from what it says, not from the stream it came on.

llama.cpp (and most engines) write everything to standard error, so ``stderr`` says nothing
about a line. The level is read from the line itself, first rule that matches:

1. A Python traceback: ``Traceback (most recent call last):``, the indented lines and
   blank lines after it, the "During handling of the above exception" links, and the
   exception line that ends it are all ``error``.
2. A level marker the program wrote: llama.cpp's ``I``/``W``/``E``/``D`` after its
   timestamp (``0.00.004.560 W srv init: ...``), glog's ``W1201 12:00:00``, a level word in
   capitals near the start (``INFO:``, ``2026-01-01 12:00:00 WARNING ...``, ``[ERROR]``), a
   bracketed lower-case one (``[warn]``) or ``level=error``. The program knows best: a line
   it marks ``I`` is ``info`` even if it mentions an error.
3. Words anywhere: ``error``, ``fatal``, ``exception``, ``panic``, ``failed``, ``failure``,
   ``aborted``, ``out of memory``, ``segmentation fault`` or a name such as
   ``ConnectionResetError`` make it ``error``; ``warn``, ``warning``, ``deprecated`` or a
   name such as ``UserWarning`` make it ``warning``.
4. Anything else is ``info``.

The dashboard (``web/static/app.js``, ``lineLevel``) applies the same rules;
``tests/test_log_levels.py`` checks that both agree on the same lines.
"""

from __future__ import annotations

import re
from typing import Final

ERROR: Final = "error"
WARNING: Final = "warning"
INFO: Final = "info"
LEVELS: Final = (ERROR, WARNING, INFO)

_MARKER_LEVELS = {
    "E": ERROR,
    "F": ERROR,
    "W": WARNING,
    "I": INFO,
    "D": INFO,
    "T": INFO,
    "TRACE": INFO,
    "DEBUG": INFO,
    "INFO": INFO,
    "NOTICE": INFO,
    "WARN": WARNING,
    "WARNING": WARNING,
    "ERROR": ERROR,
    "CRITICAL": ERROR,
    "FATAL": ERROR,
    "PANIC": ERROR,
    "ALERT": ERROR,
    "EMERG": ERROR,
    "CRIT": ERROR,
}
# Every pattern is ASCII-only, as JavaScript's are, so that the dashboard reads a line the
# same way.
# llama.cpp: an optional "0.00.004.560" timestamp, then one level letter.
_LLAMA = re.compile(r"^\s*(?:\d+(?:\.\d+)+\s+)?([DIWE]) ", re.ASCII)
# glog / absl: "W1201 04:19:54.123456 ..."
_GLOG = re.compile(r"^([IWEF])\d{4} ", re.ASCII)
# A level word in capitals among the first words (Python logging, uvicorn, vLLM, Go).
_NAMED = re.compile(
    r"(?<![\w-])(TRACE|DEBUG|INFO|NOTICE|WARNING|WARN|ERROR|CRITICAL|FATAL|PANIC)(?![\w-])",
    re.ASCII,
)
NAMED_WITHIN: Final = 48  # characters from the start where a level word counts
# nginx-style "[warn]", and logfmt / JSON "level=error", "level": "error".
_TAGGED = re.compile(
    r"\[(debug|info|notice|warn|warning|error|crit|critical|alert|emerg|fatal)\]"
    r"|\blevel\"?\s*[:=]\s*\"?(trace|debug|info|notice|warn|warning|error|critical|fatal|panic)\b",
    re.IGNORECASE | re.ASCII,
)
_ERROR_WORDS = re.compile(
    r"\b(?:error|fatal|exception|panic|failed|failure|aborted|out of memory|segmentation fault)\b",
    re.IGNORECASE | re.ASCII,
)
_ERROR_NAMES = re.compile(r"\b[A-Z][A-Za-z0-9]*(?:Error|Exception)\b", re.ASCII)
_WARNING_WORDS = re.compile(
    r"\b(?:warn|warns|warned|warning|warnings|deprecated)\b", re.IGNORECASE | re.ASCII
)
_WARNING_NAMES = re.compile(r"\b[A-Z][A-Za-z0-9]*Warning\b", re.ASCII)
_TRACEBACK = "Traceback (most recent call last):"
_CHAINED = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)


# Every line of every model is classified as it is captured (llama.cpp prints about ten
# per request), so a plain line must be cheap: substring tests on the lower-cased line
# decide which of the regular expressions can match at all (measured: a plain llama.cpp
# line 4.0 us with every search, 1.4 us with these tests first).
_NAMED_HINTS = ("info", "warn", "error", "debug", "trace", "notice", "crit", "fatal", "panic")
_HINTS = (
    "error", "fatal", "exception", "panic", "fail", "abort", "out of memory",
    "segmentation", "warn", "deprecated", "level", "[",
)  # fmt: skip


def _hinted(lowered: str) -> bool:
    for hint in _HINTS:  # noqa: SIM110 - a loop: any() over a generator costs more here
        if hint in lowered:
            return True
    return False


def _marked(message: str, lowered: str, hinted: bool) -> str | None:
    """Rule 2 after the line-start markers (which ``classify`` looks for first)."""
    head = lowered[:NAMED_WITHIN]
    for word in _NAMED_HINTS:
        if word in head:
            match = _NAMED.search(message[:NAMED_WITHIN])
            if match:
                return _MARKER_LEVELS[match.group(1)]
            break
    match = _TAGGED.search(message) if hinted else None
    if match:
        return _MARKER_LEVELS[(match.group(1) or match.group(2)).upper()]
    return None


def classify(message: str) -> str:
    """The level of one line on its own (no traceback context): rules 2 to 4."""
    # A line-start marker decides alone (rule 2 comes before rule 3's words), and nearly
    # every line an engine prints has one (llama.cpp's "0.00.004.560 I ..."): checked
    # first, before the lower-cased copy and the hints the other rules need.
    match = _LLAMA.match(message) or _GLOG.match(message)
    if match:
        return _MARKER_LEVELS[match.group(1)]
    lowered = message.lower()
    hinted = _hinted(lowered)
    marked = _marked(message, lowered, hinted)
    if marked is not None:
        return marked
    if not hinted:
        return INFO
    if _ERROR_WORDS.search(message) or _ERROR_NAMES.search(message):
        return ERROR
    if _WARNING_WORDS.search(message) or _WARNING_NAMES.search(message):
        return WARNING
    return INFO


class StreamLevels:
    """Levels of the lines of a model's log, in order: remembers, per stream, a traceback
    that is still open."""

    def __init__(self) -> None:
        self._in_traceback: set[str] = set()  # streams whose traceback is still open

    def level(self, stream: str, message: str) -> str:
        if message.startswith(_TRACEBACK):
            self._in_traceback.add(stream)
            return ERROR
        if stream in self._in_traceback:
            if message.strip() and not message[:1].isspace() and not message.startswith(_CHAINED):
                self._in_traceback.discard(stream)  # the exception line ends the traceback
            return ERROR
        return classify(message)

    def levels(self, stream: str, messages: list[str]) -> list[str]:
        """``level`` of each line of one read, in order. A line with a line-start marker
        outside a traceback (nearly every line an engine prints) is read here, without the
        two calls per line of ``level`` and ``classify``: the same answer, as a line-start
        marker is never a traceback's first line."""
        in_traceback = self._in_traceback
        levels = []
        for message in messages:
            if stream not in in_traceback:
                match = _LLAMA.match(message) or _GLOG.match(message)
                if match is not None:
                    levels.append(_MARKER_LEVELS[match.group(1)])
                    continue
            levels.append(self.level(stream, message))
        return levels
