"""The README's first hour (issue 16): scripts/first_hour.py run from a fresh copy of this
repository, and the pieces it reads from the README. Docs that stopped being true are
caught here too."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import first_hour  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_script_reads_the_quick_start() -> None:
    section = first_hour.quick_start(README)
    commands = [c for b in first_hour.blocks(section, "sh") for c in first_hour.shell_commands(b)]
    curls = [(c, shown) for c, shown in commands if c.startswith("curl ")]
    assert [c.split()[1] for c, _ in curls] == [
        "http://127.0.0.1:8080/v1/completions",
        "http://127.0.0.1:8080/v1/embeddings",
    ]
    completion, shown = curls[0]
    assert '"temperature": 0' in completion  # the answer shown is the one it always gives
    assert any('"text":" Berlin."' in line for line in shown)
    [python] = first_hour.blocks(section, "python")
    assert first_hour.expected_prints(python) == ['" Berlin."', "384"]
    assert "llama-server" in first_hour.minimal_config(README)


def test_check_answer_compares_with_what_the_readme_shows() -> None:
    shown = ['{"choices":[{"text":" Berlin.","index":0}],', '"object":"text_completion"}']
    good = '{"choices": [{"text": " Berlin."}], "object": "text_completion"}'
    first_hour.check_answer("curl", good, shown)
    with pytest.raises(first_hour.StepFailed, match="Berlin and"):
        first_hour.check_answer(
            "curl", '{"choices": [{"text": " Berlin and"}], "object": "text_completion"}', shown
        )
    with pytest.raises(first_hour.StepFailed, match="did not answer JSON"):
        first_hour.check_answer("curl", "<html>", shown)


# Sentences that were true once and are not any more: features said to be missing that
# exist (logs, devices, key checks, a CLI that sends keys, a log endpoint).
STALE = [
    r"exists? yet",
    r"do(es)? not exist yet",
    r"neither exists",
    r"not checked yet",
    r"send no key yet",
    r"no\s+endpoint to read this log",
]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_stale_promises(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for pattern in STALE:
        assert not re.search(pattern, text, re.IGNORECASE), (page.name, pattern)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_first_hour_from_a_fresh_copy() -> None:
    """The whole walk, from a copy of the working tree (what a commit of it would hold),
    reusing this environment's packages so that `make run` installs only the package."""
    for tool in ("git", "make", "curl"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool}")
    if not (ROOT / ".git").exists():
        pytest.skip("needs the repository's git metadata to list its files")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "first_hour.py"),
            "--source",
            str(ROOT),
            "--reuse-venv",
            sys.prefix,
        ],
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "every step behaved as written" in result.stdout
