"""The CLI finds its server (issue 16, point 1), driven as a person drives it: `llm-manager`
as a subprocess, against a real `llm-manager serve` on a port that is not 8080.

Order: --url (before or after the command), $LLM_MANAGER_URL, then the configuration
`serve` would load here: the URL its running server wrote into DATA_DIR/run/url.json, then
its server.port. A port already taken is said so, with the way out; `make run` takes PORT
and CONFIG."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import fake_command
from tests.test_server_process import Manager, launch, stop_cleanly, write_config

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "llm_manager"]


@pytest.fixture
def managers() -> Iterator[list[Manager]]:
    started: list[Manager] = []
    yield started
    for m in started:
        stop_cleanly(m)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_MANAGER_")}
    env["COLUMNS"] = "160"
    env.update(extra)
    return env


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=60
    )


def one_model(tmp_path: Path, spawn_log: Path, **server: object) -> Path:
    command = fake_command("--spawn-log", str(spawn_log))
    return write_config(tmp_path, {"tiny": {"schemes": {"cpu": {"command": command}}}}, **server)


def test_url_before_or_after_the_command_and_from_the_environment(
    tmp_path: Path, spawn_log: Path, managers: list[Manager]
) -> None:
    m = launch(one_model(tmp_path, spawn_log), tmp_path)
    managers.append(m)
    elsewhere = tmp_path / "elsewhere"  # no configuration here: only the URL can say
    elsewhere.mkdir()
    for args in (
        ["--url", m.url, "models"],
        ["models", "--url", m.url],
        ["--url", m.url, "logs", "tiny"],
        ["logs", "--url", m.url, "tiny"],
        ["--url", m.url.removeprefix("http://"), "models"],  # the scheme may be left out
    ):
        result = cli(*args, cwd=elsewhere)
        assert result.returncode == 0, (args, result.stderr)
    result = cli("models", "--json", cwd=elsewhere, LLM_MANAGER_URL=m.url)
    assert result.returncode == 0 and "tiny" in json.loads(result.stdout)["models"]
    # A command's own --url wins over the one before it, and over the environment.
    result = cli("--url", "http://127.0.0.1:9", "models", "--url", m.url, cwd=elsewhere)
    assert result.returncode == 0
    result = cli("models", "--url", m.url, cwd=elsewhere, LLM_MANAGER_URL="http://127.0.0.1:9")
    assert result.returncode == 0


def test_the_port_of_the_configuration_here(
    tmp_path: Path, spawn_log: Path, managers: list[Manager]
) -> None:
    port = free_port()
    config = one_model(tmp_path, spawn_log, port=port)  # tmp_path/llm-manager.yaml
    log = tmp_path / "manager.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    m = Manager(proc, log, f"http://127.0.0.1:{port}")
    managers.append(m)
    deadline = time.monotonic() + 30
    while "listening on" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    (tmp_path / "data" / "run" / "url.json").unlink()  # only the configuration can say
    result = cli("models", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tiny" in result.stdout
    # $LLM_MANAGER_CONFIG names it from anywhere, as it does for serve.
    result = cli("models", cwd=tmp_path / "data", LLM_MANAGER_CONFIG=str(config))
    assert result.returncode == 0, result.stderr


def test_the_url_a_running_serve_wrote(
    tmp_path: Path, spawn_log: Path, managers: list[Manager]
) -> None:
    # The configuration says 8080-something that nobody listens on; serve ran with --port 0.
    config = one_model(tmp_path, spawn_log, port=free_port())
    m = launch(config, tmp_path)  # serve --config ... --port 0
    managers.append(m)
    record = json.loads((tmp_path / "data" / "run" / "url.json").read_text())
    assert record["url"] == m.url and record["pid"] == m.proc.pid
    result = cli("start", "tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = cli("models", cwd=tmp_path)
    assert result.returncode == 0 and "ready" in result.stdout
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=30) == 0
    assert not (tmp_path / "data" / "run" / "url.json").exists()  # removed at a clean exit


def _config_with_record(tmp_path: Path, record: dict[str, object]) -> int:
    """A configuration on a free port with nothing listening, and ``record`` as the URL
    record of its data directory; the port."""
    port = free_port()
    (tmp_path / "llm-manager.yaml").write_text(
        yaml.safe_dump({"server": {"port": port, "data_dir": "./data"}})
    )
    run_dir = tmp_path / "data" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "url.json").write_text(json.dumps(record))
    return port


def test_a_stale_record_is_ignored_and_the_error_says_what_was_tried(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"url": "http://127.0.0.1:9", "pid": dead.pid, "create_time": 1.0}
    port = _config_with_record(tmp_path, stale)
    result = cli("models", cwd=tmp_path)
    assert result.returncode == 2
    err = result.stderr
    assert f"cannot reach LLM-Manager at http://127.0.0.1:{port}" in err
    assert "server.port of llm-manager.yaml" in err
    assert "127.0.0.1:9" not in err  # the dead manager's address was not tried
    assert "--url http://HOST:PORT (before or after the command)" in err
    assert "$LLM_MANAGER_URL" in err


def test_every_address_tried_is_listed(tmp_path: Path) -> None:
    # A record of a live process (this test) whose server is not there.
    me = {"url": "http://127.0.0.1:9", "pid": os.getpid(), "create_time": None}
    port = _config_with_record(tmp_path, me)
    result = cli("models", cwd=tmp_path)
    assert result.returncode == 2
    assert "tried:" in result.stderr
    tried = re.findall(r"^  (http://\S+) \((.+?)\):", result.stderr, re.M)
    assert [url for url, _ in tried] == ["http://127.0.0.1:9", f"http://127.0.0.1:{port}"]
    assert "written by the manager serving llm-manager.yaml" in tried[0][1]


def test_not_an_llm_manager(tmp_path: Path) -> None:
    with socket.socket() as sock:  # answers anything with a non-JSON page
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = subprocess.Popen(
            [*CLI, "models", "--url", f"http://127.0.0.1:{port}"],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        conn, _ = sock.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        conn.close()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "did not answer JSON: is it LLM-Manager?" in err


def test_serve_says_the_port_is_taken_and_what_to_do(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [*CLI, "serve", "--config", str(config), "--port", str(port)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    err = result.stderr
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in err
    assert f"Another program already listens on port {port}" in err
    assert f"--port {port + 1}" in err and f"make run PORT={port + 1}" in err
    assert "--port 0" in err


def test_make_run_takes_port_and_config(tmp_path: Path, spawn_log: Path) -> None:
    if not (ROOT / ".venv" / "bin" / "llm-manager").exists():
        pytest.skip("needs the repository's .venv (make run serves from it)")
    config = one_model(tmp_path, spawn_log)
    port = free_port()
    log = tmp_path / "make.log"
    env = clean_env()
    env.pop("PORT", None)
    with log.open("wb") as out:
        # -o: the install stamp counts as done (this test is not about installing).
        make = subprocess.Popen(
            [
                "make",
                "-s",
                "-o",
                ".venv/.installed-quickstart",
                "run",
                f"PORT={port}",
                f"CONFIG={config}",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while f"listening on http://127.0.0.1:{port}" not in log.read_text():
            assert make.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert f"configuration: {config}" in log.read_text()
        result = cli("models", "--url", f"http://127.0.0.1:{port}", cwd=tmp_path)
        assert result.returncode == 0 and "tiny" in result.stdout
    finally:
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        try:
            make.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    # An exported PORT meant for another program is not taken for the manager's.
    dry = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed-quickstart", "run"],
        cwd=ROOT,
        env={**env, "PORT": "3000"},
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0 and "--port" not in dry.stdout, dry.stdout
