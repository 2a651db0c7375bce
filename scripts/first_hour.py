#!/usr/bin/env python3
"""The README's first hour, from a fresh copy of the repository in a temporary folder.

Does what README.md's "Quick start" tells a new user to do, reading the commands from the
README itself, and fails on the first step that does not behave as written:

1. a fresh copy of the repository (``--source DIR``: the files git would commit there,
   uncommitted work included; ``--clone``: ``git clone`` of its HEAD);
2. ``make run PORT=N`` (the README's way to start it when 8080 is taken; ``--port 8080``
   runs plain ``make run``): the Makefile creates ``.venv``, installs, serves;
3. every ``curl`` command of the Quick start, checked against the answer the README shows
   below it (the completion's text, the answer's ``object``, 384-dimension vectors);
4. the README's Python example with the ``openai`` client, checked against the output
   its comments show;
5. ``.venv/bin/llm-manager models`` and ``.venv/bin/llm-manager logs gemma``, without
   ``--url``: they must find the server on its port by themselves;
6. the dashboard at ``/ui``;
7. ``llm-manager check-config`` on the README's minimal configuration;
8. Ctrl-C (SIGINT to the foreground process group, as a terminal sends it): the manager
   exits, no model process is left, and its ``run/url.json`` is gone.

``--reuse-venv PATH`` makes step 2 fast: the copy's ``.venv`` is created beforehand with a
``.pth`` file that puts PATH's site-packages on its path, so ``make run``'s
``pip install -e '.[quickstart]'`` finds every dependency installed and only installs the
package itself (the Makefile's own steps still run). Without it, ``make run`` installs
everything from the package index, as on a new machine.

Exit status 0 when every step behaved as written, 1 otherwise. Example (what CI runs):

    .venv/bin/python scripts/first_hour.py --source . --reuse-venv .venv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:(\d+))")
README_URL = "http://127.0.0.1:8080"


class StepFailed(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    began = time.monotonic()
    say(f"-- {title}")
    try:
        yield
    except StepFailed as exc:
        say(f"   FAILED after {time.monotonic() - began:.1f} s: {exc}")
        raise
    say(f"   ok ({time.monotonic() - began:.1f} s)")


def check(condition: bool, message: str) -> None:
    if not condition:
        raise StepFailed(message)


# --- the README --------------------------------------------------------------------------


def quick_start(readme: str) -> str:
    start = readme.index("## Quick start")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def blocks(text: str, language: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(text) if m.group(1) == language]


def shell_commands(block: str) -> list[tuple[str, list[str]]]:
    """Each command of a sh block (continuation lines joined), with the ``#`` comment lines
    that follow it: the answer the README shows."""
    found: list[tuple[str, list[str]]] = []
    command: list[str] = []
    for line in block.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if found and not command:
                found[-1][1].append(stripped[1:].strip())
            continue
        if not stripped:
            continue
        command.append(stripped.rstrip("\\").strip())
        if not stripped.endswith("\\"):
            found.append((" ".join(command), []))
            command = []
    return found


def minimal_config(readme: str) -> str:
    start = readme.index("## A minimal configuration")
    return blocks(readme[start:], "yaml")[0]


# --- the copy ----------------------------------------------------------------------------


def copy_tree(source: Path, dest: Path, clone: bool) -> None:
    if clone:
        subprocess.run(["git", "clone", "--quiet", str(source), str(dest)], check=True)
        return
    listed = subprocess.run(
        ["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.decode()
    dest.mkdir(parents=True)
    for name in filter(None, listed.split("\0")):
        src = source / name
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def prepare_venv(repo: Path, reuse: Path) -> None:
    """``.venv`` with the reused environment's packages on its path, before ``make run``."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = sorted(reuse.resolve().glob(f"lib/{version}/site-packages"))
    check(bool(found), f"no {version} site-packages under {reuse} (run this with its Python)")
    subprocess.run([sys.executable, "-m", "venv", str(repo / ".venv")], check=True)
    mine = sorted((repo / ".venv").glob("lib/python3*/site-packages"))[0]
    (mine / "_first_hour_reuse.pth").write_text(f"{found[0]}\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- talking to it -----------------------------------------------------------------------


def get_json(url: str, timeout: float = 30) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def run(
    argv: list[str] | str, cwd: Path, timeout: float = 180, shell: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_MANAGER_URL", "VIRTUAL_ENV")}
    env.pop("LLM_MANAGER_CONFIG", None)
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, shell=shell, env=env
    )


def check_answer(command: str, output: str, shown: list[str]) -> None:
    """The answer against what the README shows under the command."""
    try:
        answer = json.loads(output)
    except ValueError:
        raise StepFailed(f"`{command}` did not answer JSON: {output[:300]!r}") from None
    check("error" not in answer, f"`{command}` answered an error: {output[:300]}")
    text = " ".join(shown)
    for key in ("object", "model"):
        expected = re.search(rf'"{key}":\s*"([^"]+)"', text)
        if expected:
            check(
                answer.get(key) == expected.group(1),
                f"{key} is {answer.get(key)!r}, the README shows {expected.group(1)!r}",
            )
    written = re.search(r'"text":\s*"((?:[^"\\]|\\.)*)"', text)
    if written:
        expected_text = json.loads(f'"{written.group(1)}"')
        got = answer["choices"][0]["text"]
        check(
            got == expected_text, f"the model answered {got!r}, the README shows {expected_text!r}"
        )
    if answer.get("object") == "list" and answer.get("data"):
        dims = len(answer["data"][0]["embedding"])
        check(dims == 384, f"{dims}-dimension vectors, the README says 384")


def expected_prints(code: str) -> list[str]:
    """What the README's Python example says it prints (``print(...)  # X``)."""
    out = []
    for line in code.splitlines():
        match = re.match(r"\s*print\(.*\)\s*#\s*(.+)$", line)
        if match:
            out.append(match.group(1).strip())
    return out


# --- the walk ----------------------------------------------------------------------------


def walk(repo: Path, port_choice: str, reuse: Path | None) -> None:
    readme = (repo / "README.md").read_text(encoding="utf-8")
    section = quick_start(readme)
    check("make run" in section, "the Quick start no longer says `make run`")
    bin_dir = repo / ".venv" / "bin"

    if reuse is not None:
        with step(f"prepare .venv reusing the packages of {reuse}"):
            prepare_venv(repo, reuse)

    port = 8080 if port_choice == "8080" else free_port()
    argv = ["make", "run"] if port == 8080 else ["make", "run", f"PORT={port}"]
    log_path = repo / "make-run.log"
    with step(f"{' '.join(argv)} (creates .venv, installs, serves)"):
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PORT")}
        env.pop("LLM_MANAGER_CONFIG", None)
        env.pop("LLM_MANAGER_URL", None)
        with log_path.open("wb") as log:
            make = subprocess.Popen(
                argv,
                cwd=repo,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, as a terminal's job
            )
        deadline = time.monotonic() + 900
        while not (found := LISTENING.search(log_path.read_text(errors="replace"))):
            if make.poll() is not None:
                raise StepFailed(
                    f"make run exited {make.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            check(time.monotonic() < deadline, "make run did not listen within 15 minutes")
            time.sleep(0.2)
        url = found.group(1)
        check(int(found.group(2)) == port, f"listening on {url}, not on port {port}")
        check(
            "configuration: built-in quick-start configuration" in log_path.read_text(),
            "make run did not serve the built-in quick-start configuration",
        )

    try:
        commands = [c for block in blocks(section, "sh") for c in shell_commands(block)]
        curls = [(c, shown) for c, shown in commands if c.startswith("curl ")]
        check(len(curls) >= 2, "the Quick start shows fewer than two curl commands")
        for command, shown in curls:
            actual = command.replace(README_URL, url)
            with step(f"README: {command[:90]}"):
                result = run(actual, repo, shell=True)
                check(result.returncode == 0, f"curl exited {result.returncode}: {result.stderr}")
                check_answer(command, result.stdout, shown)

        python = blocks(section, "python")
        check(len(python) == 1, "the Quick start should show one Python example")
        with step("README: the Python example with the openai client"):
            py = str(bin_dir / "python")
            if run([py, "-c", "import openai"], repo).returncode != 0:
                pip = run([str(bin_dir / "pip"), "install", "-q", "openai"], repo, timeout=600)
                check(pip.returncode == 0, f"pip install openai failed: {pip.stderr[-2000:]}")
            result = run([py, "-c", python[0].replace(README_URL, url)], repo)
            check(result.returncode == 0, f"the example failed:\n{result.stderr[-3000:]}")
            printed = result.stdout.splitlines()
            for expected in expected_prints(python[0]):
                # `# " Berlin."` shows a string with its spaces; `# 384` a plain value.
                wanted = json.loads(expected) if expected.startswith('"') else expected
                check(
                    any(line == wanted for line in printed),
                    f"the README says it prints {expected}; it printed {printed}",
                )

        with step("README: .venv/bin/llm-manager models (no --url: it finds the server)"):
            result = run([str(bin_dir / "llm-manager"), "models"], repo)
            check(result.returncode == 0, f"exit {result.returncode}: {result.stderr}")
            for word in ("gemma-3-270m", "multilingual-e5-small", "ready"):
                check(word in result.stdout, f"{word!r} is not in:\n{result.stdout}")

        with step("README: .venv/bin/llm-manager logs gemma"):
            result = run([str(bin_dir / "llm-manager"), "logs", "gemma"], repo)
            check(result.returncode == 0, f"exit {result.returncode}: {result.stderr}")
            check("ready after" in result.stdout, f"no 'ready after' in:\n{result.stdout[-2000:]}")

        with step("README: the dashboard at /ui"):
            with urllib.request.urlopen(url + "/ui", timeout=30) as resp:
                page = resp.read().decode()
            check("LLM-Manager" in page and "app.js" in page, "/ui is not the dashboard")

        with step("README: check-config on the minimal configuration"):
            mine = repo / "minimal.yaml"
            mine.write_text(minimal_config(readme), encoding="utf-8")
            result = run([str(bin_dir / "llm-manager"), "check-config", str(mine)], repo)
            check(result.returncode == 0, f"exit {result.returncode}: {result.stderr}")
            check(": valid (" in result.stdout, f"not valid:\n{result.stdout}{result.stderr}")

        pids = [
            info["pid"]
            for info in get_json(url + "/api/models/all-models/info")["models"].values()
            if info["pid"]
        ]
    except BaseException:
        os.killpg(make.pid, signal.SIGKILL)
        make.wait()
        say(f"   the manager's output:\n{log_path.read_text(errors='replace')[-3000:]}")
        raise

    with step("Ctrl-C: the manager stops every model and exits"):
        os.killpg(make.pid, signal.SIGINT)  # what a terminal sends to its foreground job
        try:
            make.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            raise StepFailed("still running 60 s after Ctrl-C") from None
        text = log_path.read_text(errors="replace")
        check("shutting down" in text, f"no 'shutting down' in its output:\n{text[-2000:]}")
        deadline = time.monotonic() + 15
        while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        check(not left, f"model processes left behind: {left}")
        check(
            not (repo / "data" / "run" / "url.json").exists(),
            "data/run/url.json was not removed at exit",
        )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the repository to copy (default: this script's)",
    )
    parser.add_argument(
        "--clone",
        action="store_true",
        help="git clone the source's HEAD instead of copying its working tree",
    )
    parser.add_argument(
        "--reuse-venv",
        type=Path,
        default=None,
        help="an installed .venv whose packages the copy's .venv may use (fast)",
    )
    parser.add_argument(
        "--port",
        default="auto",
        help="'auto': make run PORT=<a free port> (default); '8080': plain make run",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="llm-manager-first-hour-"))
    repo = workdir / "llm-manager"
    try:
        with step(f"fresh copy of {args.source} in {repo}"):
            copy_tree(args.source.resolve(), repo, args.clone)
        walk(repo, args.port, args.reuse_venv)
    except StepFailed:
        say(f"first hour: FAILED after {time.monotonic() - began:.0f} s (kept {workdir})")
        return 1
    finally:
        if args.keep:
            say(f"kept {workdir}")
    shutil.rmtree(workdir, ignore_errors=True)
    say(f"first hour: every step behaved as written ({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
