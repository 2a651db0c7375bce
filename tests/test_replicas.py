"""Gateway replicas (docs/replicas.md): several `llm-manager serve` processes on one local
multi-node Ray cluster (ray.cluster_utils.Cluster), one real PostgreSQL store, nginx in
front; the models run by the cluster's controller, the fake model server as the engine.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.balancer import Balancer, find_nginx
from tests.conftest import alive, fake_command, read_pids
from tests.test_cluster import ray_cluster  # noqa: F401 - the module's cluster fixture
from tests.test_server_process import Manager, launch

pytestmark = pytest.mark.timeout(240)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Replica(Manager):
    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")


def _config(
    tmp_path: Path, cluster: dict[str, Any], store: str, models: dict[str, Any], **server: Any
) -> Path:
    data = {
        "server": {"data_dir": str(tmp_path / "data"), "stop_timeout": "2s", **server},
        "models": models,
        "cluster": {
            "address": cluster["cluster"].address,
            "namespace": f"r{time.monotonic_ns()}",  # a controller of the test's own
            "replicas": True,
        },
        "store": store,
    }
    path = tmp_path / "llm-manager.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _model(spawn_log: Path, *switches: str, **extra: Any) -> dict[str, Any]:
    command = fake_command("--host", "{host}", "--spawn-log", str(spawn_log), *switches)
    return {"schemes": {"gpu": {"devices": {"cuda:0": 1000}, "command": command}}, **extra}


def _launch(config: Path, folder: Path) -> Replica:
    folder.mkdir(parents=True, exist_ok=True)
    started = launch(config, folder, timeout=90)  # joining Ray, finding the controller
    return Replica(started.proc, started.log, started.url)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Callable[[Path, int], list[Replica]]]:
    started: list[Replica] = []

    def start(config: Path, count: int) -> list[Replica]:
        # One after the other: the first starts the controller, the others find it.
        new = [_launch(config, tmp_path / f"replica{len(started) + i}") for i in range(count)]
        started.extend(new)
        return new

    yield start
    for r in started:
        if r.proc.poll() is None:
            r.proc.terminate()
    for r in started:
        try:
            r.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[Callable[[list[Replica]], Balancer]]:
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("needs nginx (Debian: apt-get install nginx)")
    made: list[Balancer] = []

    def make(behind: list[Replica]) -> Balancer:
        made.append(Balancer(nginx, tmp_path / "nginx", [r.address for r in behind]))
        return made[-1]

    yield make
    for b in made:
        b.stop()


def _post(url: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, str, bytes]:
    """(status, the replica nginx chose or "", body); a connection error is status 0."""
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.headers.get("X-Replica", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Replica", ""), exc.read()
    except (OSError, http.client.HTTPException):  # refused, or cut (a killed replica)
        return 0, "", b""


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def _info(replica: Replica, model: str = "m") -> dict[str, Any]:
    info: dict[str, Any] = replica.get(f"/api/models/{model}/info")["model"]
    return info


def _requests(replica: Replica) -> int:
    totals = replica.get("/api/usage?since=1h")["totals"]
    count: int = totals.get("m", {}).get("requests", 0)
    return count


def test_first_requests_through_the_balancer_start_the_model_once(
    tmp_path: Path,
    ray_cluster: dict[str, Any],  # noqa: F811
    postgres: Any,
    spawn_log: Path,
    replicas: Callable[[Path, int], list[Replica]],
    balancer: Callable[[list[Replica]], Balancer],
) -> None:
    config = _config(
        tmp_path,
        ray_cluster,
        postgres.new_database(),
        {"m": _model(spawn_log, "--slow-start", "1")},
    )
    both = replicas(config, 2)
    front = balancer(both)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _post(front.url, CHAT), range(8)))
    assert [a[0] for a in answers] == [200] * 8, answers
    assert {a[1] for a in answers} == {r.address for r in both}  # both replicas served
    assert len(read_pids(spawn_log)) == 1  # one start for every replica
    infos = [_info(r) for r in both]
    assert {i["status"] for i in infos} == {"routing"}
    assert len({i["pid"] for i in infos}) == 1 and infos[0]["pid"] in read_pids(spawn_log)
    # The usage of both replicas, in either replica's answer.
    for r in both:
        _wait(lambda r=r: _requests(r) == 8, 15, f"8 requests in {r.url}/api/usage")
    health = both[0].get("/health")
    assert (
        health["cluster"]["controller"]["ok"] and health["cluster"]["controller"]["replicas"] == 2
    )
    assert health["storage"]["store"].startswith("postgresql://")
    # The model log, kept by the controller, is shown by every replica.
    url = both[1].url + "/api/models/m/logs/stream?follow=false"
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert "starting with scheme gpu" in resp.read().decode()


def test_idle_unload_waits_for_a_request_pending_on_another_replica(
    tmp_path: Path,
    ray_cluster: dict[str, Any],  # noqa: F811
    postgres: Any,
    spawn_log: Path,
    replicas: Callable[[Path, int], list[Replica]],
) -> None:
    model = _model(spawn_log, "--chunks", "8", "--chunk-delay", "0.5", idle_timeout="1s")
    config = _config(tmp_path, ray_cluster, postgres.new_database(), {"m": model})
    one, two = replicas(config, 2)
    assert _post(one.url, CHAT)[0] == 200  # started through the first replica
    began = time.monotonic()
    status, _, body = _post(two.url, {**CHAT, "stream": True})  # 4 s on the second
    took = time.monotonic() - began
    assert status == 200 and b"data: [DONE]" in body, body[-200:]
    assert took > 3.5
    assert len(read_pids(spawn_log)) == 1  # not stopped (and started again) meanwhile
    assert _info(one)["status"] == "routing"
    # Unused on both now: unloaded after its idle second, and the replicas' reports.
    _wait(lambda: _info(one)["status"] == "stopped", 10, "idle unload")
    _wait(lambda: _info(two)["status"] == "stopped", 5, "the other replica sees it")
    pid = read_pids(spawn_log)[0]
    _wait(lambda: not alive(pid), 10, "the engine process ended")


def test_a_replica_killed_mid_load_loses_no_acknowledged_row(
    tmp_path: Path,
    ray_cluster: dict[str, Any],  # noqa: F811
    postgres: Any,
    spawn_log: Path,
    replicas: Callable[[Path, int], list[Replica]],
    balancer: Callable[[list[Replica]], Balancer],
) -> None:
    models = {
        "m": _model(spawn_log),
        # 30 s streams, unloaded after 2 idle seconds.
        "long": _model(spawn_log, "--chunks", "300", "--chunk-delay", "0.1", idle_timeout="2s"),
    }
    config = _config(tmp_path, ray_cluster, postgres.new_database(), models)
    one, two = replicas(config, 2)
    front = balancer([one, two])
    assert _post(one.url, CHAT)[0] == 200
    # A long stream on the replica to be killed: it must stop counting once it is gone.
    long_chat = {**CHAT, "model": "long", "stream": True}
    threading.Thread(target=_post, args=(two.url, long_chat), daemon=True).start()
    _wait(lambda: _info(one, "long")["status"] == "routing", 20, "the long stream began")
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            status, replica, _ = _post(front.url, CHAT, timeout=30)
            results.append((time.monotonic(), status, replica))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(2.0)
    written = two.get("/health")["storage"]["written"]  # rows the killed one had stored
    os.kill(two.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(3.0)
    stop.set()
    for w in workers:
        w.join(timeout=60)
    served_by_one = sum(1 for _, s, r in results if s == 200 and r == one.address)
    served_by_two = sum(1 for _, s, r in results if s == 200 and r == two.address)
    after = [s for t, s, _ in results if t > killed + 1.0]
    assert served_by_one and served_by_two and written
    assert after and set(after) == {200}, results[-20:]  # the other one keeps serving
    # Every row the survivor acknowledged, and every row the killed one had stored.
    one.proc.terminate()  # a clean stop writes what is queued
    one.proc.wait(timeout=30)
    rows = _count_rows(postgres, config)
    assert rows >= served_by_one + 1 + written, (rows, served_by_one, written)
    assert rows <= served_by_one + served_by_two + 3
    # The killed replica's stream stopped counting: "long" went idle and was unloaded
    # (with that request still counted it would stay until the stream's end, 30 s on).
    three = replicas(config, 1)[0]
    _wait(lambda: _info(three, "long")["status"] == "stopped", 10, "the killed one's stream")
    assert time.monotonic() - killed < 20


def _count_rows(postgres: Any, config: Path) -> int:
    import psycopg

    url = yaml.safe_load(config.read_text())["store"]
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT COUNT(*) FROM requests").fetchone()
    assert row is not None
    return int(row[0])


def test_the_database_restarted_mid_load_loses_no_acknowledged_row(
    tmp_path: Path,
    ray_cluster: dict[str, Any],  # noqa: F811
    postgres: Any,
    spawn_log: Path,
    replicas: Callable[[Path, int], list[Replica]],
    balancer: Callable[[list[Replica]], Balancer],
) -> None:
    config = _config(tmp_path, ray_cluster, postgres.new_database(), {"m": _model(spawn_log)})
    both = replicas(config, 2)
    front = balancer(both)
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(_post(front.url, CHAT, timeout=30)[0])

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    postgres.pause()
    try:
        time.sleep(2.0)
    finally:
        postgres.resume()
    time.sleep(1.0)
    stop.set()
    for w in workers:
        w.join(timeout=60)
    assert statuses and set(statuses) == {200}  # served while the database was down
    for r in both:  # a clean stop writes what is queued, retrying until the database answers
        r.proc.terminate()
    for r in both:
        r.proc.wait(timeout=60)
    assert _count_rows(postgres, config) == len(statuses)


def test_a_restarted_controller_adopts_the_running_engine(
    tmp_path: Path,
    ray_cluster: dict[str, Any],  # noqa: F811
    postgres: Any,
    spawn_log: Path,
    replicas: Callable[[Path, int], list[Replica]],
) -> None:
    import ray

    config = _config(tmp_path, ray_cluster, postgres.new_database(), {"m": _model(spawn_log)})
    one, two = replicas(config, 2)
    assert _post(one.url, CHAT)[0] == 200
    engine = read_pids(spawn_log)[0]
    _wait(lambda: _info(two)["status"] == "routing", 5, "the other replica sees it routing")
    namespace = yaml.safe_load(config.read_text())["cluster"]["namespace"]
    ray.init(address=ray_cluster["cluster"].address, namespace=namespace, log_to_driver=False)
    try:
        # The controller's process dies; Ray starts it again. The engine's host is detached:
        # the engine runs on, the replicas route to it meanwhile, the new controller adopts it.
        ray.kill(ray.get_actor("llm-manager-controller"), no_restart=False)
        killed = time.monotonic()
        statuses = []
        while time.monotonic() - killed < 5:
            statuses.append(_post(two.url, CHAT, timeout=30)[0])
        assert set(statuses) == {200}, statuses
        _wait(lambda: two.get("/health")["cluster"]["controller"]["ok"], 30, "a new controller")
        info = _info(one)
        assert info["status"] == "routing" and info["pid"] == engine
        assert read_pids(spawn_log) == [engine] and alive(engine)
        print(f"{len(statuses)} requests answered 200 during the 5 s after the kill")
        # Killed for good this time: a replica finds none and starts one, which adopts it.
        ray.kill(ray.get_actor("llm-manager-controller"), no_restart=True)
        killed = time.monotonic()
        _wait(lambda: not two.get("/health")["cluster"]["controller"]["ok"], 10, "seen gone")
        _wait(lambda: two.get("/health")["cluster"]["controller"]["ok"], 30, "a new controller")
        print(f"a new controller answers {time.monotonic() - killed:.1f} s after the kill")
        assert _post(one.url, CHAT)[0] == 200
        assert _info(one)["pid"] == engine and read_pids(spawn_log) == [engine]
        logs = one.url + "/api/models/m/logs/stream?follow=false"
        with urllib.request.urlopen(logs, timeout=30) as resp:
            assert resp.read().decode().count("adopted the running engine") == 2
        # Adopted, it is the controller's as any other: a stop ends it.
        assert one.post("/api/models/m/stop")["success"]
        _wait(lambda: not alive(engine), 10, "the adopted engine stopped")
        _wait(lambda: _info(two)["status"] == "stopped", 5, "the other replica sees it stopped")
    finally:
        ray.shutdown()
