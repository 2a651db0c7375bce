"""The controller and replicas of docs/replicas.md in one process, no Ray: the controller
runs on the fake cluster of test_cluster_fake.py (real engine processes on this machine),
and a replica's calls reach it directly. The races of the drain, provoked on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from llm_manager.cluster import controller as controller_module
from llm_manager.cluster.controller import Controller, Replicas, SharedSupervisor
from llm_manager.cluster.remote import RemoteEngine
from llm_manager.cluster.replica import ControllerLink, ReplicaRuntime, ReplicaSupervisor
from llm_manager.cluster.shared import REPLICA_TTL, Counts, Failure, Kept, Report
from llm_manager.config import parse_text
from llm_manager.devices.base import Device, ProviderReport
from llm_manager.devices.cluster import ClusterProvider
from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.errors import DeviceUnavailable, ModelBusy, ModelNotFound
from llm_manager.logs import LogBook, LogSettings
from llm_manager.models.launch import Launch
from llm_manager.models.scheduler import Fit
from llm_manager.ollama import keepalive
from tests.conftest import alive, fake_command, read_pids, wait_until
from tests.test_cluster_fake import FakeCluster
from tests.test_cluster_fake import config as _config
from tests.test_cluster_units import InProcess, fake_argv

pytestmark = pytest.mark.timeout(60)


class Direct:
    """An actor handle whose ``method.remote(...)`` calls the object in this process."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return SimpleNamespace(remote=getattr(self._target, name))


def _model(spawn_log: Path, mib: int = 1000, **extra: Any) -> dict[str, Any]:
    command = fake_command("--spawn-log", str(spawn_log))
    return {"schemes": {"gpu": {"devices": {"cuda:0": mib}, "command": command}}, **extra}


def _declared(mib: int) -> ProviderReport:
    """A node's GPU as declared (no reading of its own: the booked memory counts as used)."""
    gpu = Device("cuda:0", "cuda", "GPU", mib, 0, mib, index=0, measured=False)
    return ProviderReport("cuda", True, (gpu,))


@contextlib.asynccontextmanager
async def _setup(
    tmp_path: Path, models: dict[str, Any], monkeypatch: pytest.MonkeyPatch, declared: bool = False
) -> AsyncIterator[tuple[Controller, Callable[[], Any]]]:
    """The controller, and a maker of replicas (ReplicaSupervisors reporting to it)."""
    monkeypatch.setattr(controller_module, "_exit_actor", lambda: None)
    cluster = FakeCluster()
    if declared:
        for name, (node, _) in list(cluster.answers.items()):
            cluster.answers[name] = (node, [_declared(24000)])
    loaded = _config(tmp_path, models)
    controller = Controller(loaded, cluster)
    made: list[ReplicaSupervisor] = []
    async with aiohttp.ClientSession() as http:

        async def replica() -> ReplicaSupervisor:
            link = ControllerLink(Direct(controller), f"replica {len(made)}")
            logbook = LogBook(None, LogSettings(1000, 0, 0))
            monitor = DeviceMonitor([ClusterProvider(cluster)])
            sup = ReplicaSupervisor(loaded, monitor, http, logbook, None, cluster, link=link)
            await sup.start()
            made.append(sup)
            return sup

        try:
            yield controller, replica
        finally:
            for sup in made:
                await sup.shutdown()  # the last one to leave stops the models


async def _shared(controller: Controller) -> SharedSupervisor:
    return (await controller._get()).sup


async def _reported(sup: ReplicaSupervisor) -> None:
    """Until the replica has applied one more sync reply (and so reported once more)."""
    seen = sup._seen
    deadline = time.monotonic() + 5
    while sup._seen == seen:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_concurrent_starts_from_two_replicas_are_one(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _setup(tmp_path, {"m": _model(spawn_log)}, monkeypatch) as (controller, replica):
        one, two = await replica(), await replica()
        urls = await asyncio.gather(
            *(sup.resolve("m").ensure_ready() for sup in (one, two, one, two))
        )
        assert len(set(urls)) == 1
        assert len(read_pids(spawn_log)) == 1
        assert (await _shared(controller)).resolve("m").start_count == 1
        await _reported(two)
        assert two.resolve("m").state.value == "routing" and two.placed_on("m")
        # The engine's memory, read by the controller, is shown by the replicas too.
        deadline = time.monotonic() + 10
        while not two.footprints.current("m").get("cpu"):
            assert time.monotonic() < deadline, two.footprints.current("m")
            await asyncio.sleep(0.05)


async def test_a_request_that_races_an_idle_stop_keeps_the_model(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _setup(tmp_path, {"m": _model(spawn_log)}, monkeypatch) as (controller, replica):
        one = await replica()
        shared = await _shared(controller)
        mine = one.resolve("m")
        assert isinstance(mine, ReplicaRuntime)
        await mine.ensure_ready()
        await _reported(one)
        # A request begins on the replica, routed straight to the engine, not reported yet,
        # as the controller decides the model is unused.
        mine.acquire()
        assert mine.try_admit()
        async with shared.quiesced(["m"]) as going:
            assert going == []  # the replica's report, made after it saw the drain, has it
        assert "m" not in shared.draining
        mine.dismiss()
        mine.release()
        await _reported(one)
        async with shared.quiesced(["m"]) as going:
            assert going == ["m"]
            assert mine._draining  # seen by the replica before the controller's answer
            # A request that arrives now asks the controller instead of routing, and
            # waits for the stop and a start.
            waiting = asyncio.create_task(mine.ensure_ready())
            await asyncio.sleep(0.3)
            assert not waiting.done()
            assert await shared.resolve("m").stop("unused (test)")
        await asyncio.wait_for(waiting, 20)
        assert shared.resolve("m").start_count == 2
        assert len(read_pids(spawn_log)) == 2


async def test_a_silent_replica_stops_counting(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _setup(tmp_path, {"m": _model(spawn_log)}, monkeypatch) as (controller, replica):
        one, two = await replica(), await replica()
        shared = await _shared(controller)
        await one.resolve("m").ensure_ready()
        theirs = two.resolve("m")
        theirs.acquire()  # in flight on the replica about to go silent
        assert theirs.try_admit()
        await _reported(two)
        assert (shared.resolve("m").pending, shared.resolve("m").admitted) == (1, 1)
        for task in list(two._tasks):  # as if SIGKILLed: no more reports, no goodbye
            task.cancel()
        began = time.monotonic()
        async with shared.quiesced(["m"]) as going:
            waited = time.monotonic() - began
            # Its word was waited for until it expired; then its request no longer counts.
            assert going == ["m"]
        assert REPLICA_TTL - 0.5 < waited < REPLICA_TTL + 2.5
        assert (shared.resolve("m").pending, shared.resolve("m").admitted) == (0, 0)
        theirs.dismiss()
        theirs.release()


async def test_the_controller_s_refusals_reach_the_replica(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"huge": _model(spawn_log, 100000)}
    async with _setup(tmp_path, models, monkeypatch) as (controller, replica):
        one = await replica()
        with pytest.raises(DeviceUnavailable) as caught:
            await one.resolve("huge").ensure_ready()
        assert caught.value.status == 503 and "100000 MiB" in str(caught.value.detail)
        assert (await controller.ensure("nope")).failure is not None
        assert read_pids(spawn_log) == []


def test_failures_keep_their_kind_and_headers() -> None:
    busy = Failure.of(ModelBusy("waited", retry_after=7)).error()
    assert isinstance(busy, ModelBusy) and busy.headers == {"Retry-After": "7"}
    missing = Failure.of(ModelNotFound("x", ["a"])).error()
    assert isinstance(missing, ModelNotFound) and missing.status == 404
    assert missing.detail == "known models: a"
    assert type(Failure("NoSuchError", "m", None, {}).error()).__name__ == "ModelUnavailable"


async def test_replicas_count_use_and_wait_for_their_word() -> None:
    replicas = Replicas()
    assert replicas.report(Report("a", "a", 0, {"m": Counts(1, 1, 3)}, {})) == {"m"}
    assert replicas.report(Report("a", "a", 0, {"m": Counts(0, 0, 3)}, {})) == set()
    replicas.report(Report("b", "b", 0, {"m": Counts(2, 1, 1)}, {}))
    assert replicas.totals() == {"m": (2, 1)}
    mark = replicas.stamp()
    waiting = asyncio.create_task(replicas.all_seen(mark, 5))
    replicas.report(Report("a", "a", mark, {}, {}))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # b has not said it saw the mark
    replicas.report(Report("b", "b", mark, {}, {}))
    await asyncio.wait_for(waiting, 1)
    assert replicas.expire(time.monotonic() + REPLICA_TTL + 1) == ["a", "b"]
    assert len(replicas) == 0 and replicas.empty_since is not None


def test_a_report_that_runs_after_its_replica_left_does_not_bring_it_back() -> None:
    # Ray runs an async actor's calls out of order: a replica's last report, sent before
    # its leave, can run after it. Counted, the replica would be live again, and the last
    # replica's leave would not stop the models (an engine left behind).
    replicas = Replicas()
    replicas.report(Report("a", "a", 0, {"m": Counts(0, 1, 1)}, {}))
    replicas.report(Report("b", "b", 0, {}, {}))
    replicas.leave("a")
    assert replicas.report(Report("a", "a", 0, {"m": Counts(0, 1, 2)}, {})) == set()
    assert len(replicas) == 1 and replicas.totals() == {}
    replicas.leave("b")
    assert len(replicas) == 0 and replicas.empty_since is not None


def test_replicas_need_a_shared_store() -> None:
    from llm_manager.config import ConfigError

    text = "cluster: {address: 'h:6379', replicas: true}\nmodels: {}\n"
    with pytest.raises(ConfigError, match="store: postgresql"):
        parse_text(text, "test")
    parse_text(text + "store: postgresql://u@db/x\n", "test")


async def test_a_reload_on_a_replica_reaches_the_controller(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _setup(tmp_path, {"m": _model(spawn_log)}, monkeypatch) as (controller, replica):
        one = await replica()
        shared = await _shared(controller)
        report = one.reload(_config(tmp_path, {"m": _model(spawn_log), "n": _model(spawn_log)}))
        assert report["added"] == ["n"]
        deadline = time.monotonic() + 5
        while shared.registry.get("n") is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await one.resolve("n").ensure_ready()
        assert shared.resolve("n").state.value == "routing"


async def test_turns_are_kept_by_the_replicas(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two models that cannot share node a's GPU: y waits for x, whose turn then ends.
    models = {
        name: _model(spawn_log, 20000, turn_time="1s", queue_timeout="30s") for name in ("x", "y")
    }
    for spec in models.values():
        spec["schemes"]["gpu"]["nodes"] = {"node": "a"}
    async with _setup(tmp_path, models, monkeypatch, declared=True) as (controller, replica):
        one, two = await replica(), await replica()
        x = one.resolve("x")
        await x.ensure_ready()
        x.acquire()
        assert x.try_admit()  # a request in flight on x, through replica one
        await _reported(one)
        y_start = asyncio.create_task(two.resolve("y").ensure_ready())
        # The controller ends x's turn; replica one holds new requests for x at its door.
        deadline = time.monotonic() + 10
        while x.try_admit():
            x.dismiss()
            assert time.monotonic() < deadline, "x's turn never ended on the replica"
            await asyncio.sleep(0.05)
        assert not y_start.done()  # x's request is still in flight

        async def held() -> str:  # a new request for x, held at the replica's door
            x.acquire()
            try:
                await x.admit()
                try:
                    return await x.ensure_ready()
                finally:
                    x.dismiss()
            finally:
                x.release()

        waiting = asyncio.create_task(held())
        await asyncio.sleep(0.6)  # reported: pending on x, not admitted
        assert not waiting.done() and x.held == 1
        x.dismiss()
        x.release()
        # x goes although a request waits for it (its turn is over): y's turn.
        await asyncio.wait_for(y_start, 20)
        shared = await _shared(controller)
        assert shared.resolve("y").state.value == "routing"
        assert shared.resolve("x").start_count == 1 and shared.resolve("x").state.value != "routing"
        # Then x's turn again, for the request that waited.
        await asyncio.wait_for(waiting, 20)
        assert shared.resolve("x").state.value == "routing" and shared.resolve("x").start_count == 2


async def test_an_engine_is_adopted_only_under_its_unchanged_scheme(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _setup(tmp_path, {"m": _model(spawn_log)}, monkeypatch) as (controller, replica):
        one = await replica()
        shared = await _shared(controller)
        # An engine left running by the controller's earlier run, on its (in-process) host.
        calls = InProcess()
        earlier = RemoteEngine("a", "127.0.0.1", calls)
        port = await earlier.free_port()
        argv = fake_argv(port, "--spawn-log", str(spawn_log))
        await earlier.start(argv, {}, None, False, lambda s, m: None)
        fit = Fit("gpu", {"cuda:0": "a/cuda:0"}, {"a/cuda:0": 1000}, node="a")
        scheme = shared.resolve("m").spec.schemes["gpu"]
        changed = scheme.model_copy(update={"env": {"CHANGED": "1"}})
        stale = Kept("m", fit, Launch(argv, {}, None), port, "a", changed)
        assert not shared.adopt(RemoteEngine("a", "127.0.0.1", calls), stale, earlier.pid, 0)
        assert shared.resolve("m").state.value == "stopped" and not shared.booked("m")
        kept = Kept("m", fit, Launch(argv, {}, None), port, "a", scheme)
        assert shared.adopt(RemoteEngine("a", "127.0.0.1", calls), kept, earlier.pid, 0)
        runtime = shared.resolve("m")
        assert runtime.state.value == "routing" and runtime.pid == earlier.pid
        assert shared.booked("m") == {"cuda:0": 1000}
        assert (await one.resolve("m").ensure_ready()).endswith(f":{port}")
        await wait_until(lambda: bool(read_pids(spawn_log)))
        url = f"http://127.0.0.1:{port}/v1/models"  # it serves, where the replica routes
        # The fake engine records its spawn before it listens (an import and a bind later):
        # a refused connection in that moment is the test's haste, not the adoption's.
        status = 0
        for _ in range(200):
            try:
                async with aiohttp.ClientSession() as http, http.get(url) as resp:
                    status = resp.status
                break
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.05)
        assert status == 200
        assert read_pids(spawn_log) == [earlier.pid]  # adopted, not started again


async def test_with_every_replica_gone_the_controller_stops_the_models(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_module, "REPLICA_TTL", 0.5)
    monkeypatch.setattr(controller_module, "ORPHAN_SECONDS", 1.0)
    async with _setup(tmp_path, {"m": _model(spawn_log)}, monkeypatch) as (controller, replica):
        ended: list[bool] = []
        monkeypatch.setattr(controller_module, "_exit_actor", lambda: ended.append(True))
        one = await replica()
        await one.resolve("m").ensure_ready()
        pid = read_pids(spawn_log)[0]
        for task in list(one._tasks):  # killed: no more reports, no goodbye
            task.cancel()
        await wait_until(lambda: bool(ended), timeout=10)
        shared = await _shared(controller)
        assert shared.resolve("m").state.value == "stopped"
        await wait_until(lambda: not alive(pid), timeout=5)


async def test_bulk_operations_on_a_replica_act_on_the_controller_s_models(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"a": _model(spawn_log, auto_start=True), "b": _model(spawn_log)}
    async with _setup(tmp_path, models, monkeypatch) as (controller, replica):
        one = await replica()
        shared = await _shared(controller)
        await wait_until(lambda: shared.resolve("a").state.value == "routing", timeout=15)
        await one.resolve("b").ensure_ready()
        assert sorted(await one.stop_all("test")) == ["a", "b"]
        assert {r.state.value for r in shared.runtimes} == {"stopped"}
        started, failed = await one.restart_autostart()
        assert (started, failed) == (["a"], {})
        assert shared.resolve("a").state.value == "routing"
        assert shared.resolve("b").state.value == "stopped"
        assert await one.resolve("a").stop("asked on a replica")
        assert shared.resolve("a").stop_reason == "asked on a replica"


async def test_an_ollama_keep_alive_on_a_replica_reaches_the_controller(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _setup(tmp_path, {"m": _model(spawn_log)}, monkeypatch) as (controller, replica):
        one = await replica()
        shared = await _shared(controller)
        mine = one.resolve("m")
        await mine.ensure_ready()
        await _reported(one)
        # What the Ollama facade does after a request with keep_alive 0 (ollama/facade.py).
        mine.keep_alive = (keepalive.UNLOAD, mine.start_count)
        await wait_until(lambda: shared.resolve("m").state.value == "stopped", timeout=10)
        assert "idle" in str(shared.resolve("m").stop_reason)


async def test_idle_unload_waits_for_a_request_that_began_as_it_fell_due(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"m": _model(spawn_log, idle_timeout="1s")}
    async with _setup(tmp_path, models, monkeypatch) as (controller, replica):
        one = await replica()
        shared = await _shared(controller)
        mine = one.resolve("m")
        await mine.ensure_ready()
        await asyncio.sleep(0.9)  # begins as the model falls idle, before any report of it
        mine.acquire()
        assert mine.try_admit()
        await asyncio.sleep(2.0)
        assert shared.resolve("m").state.value == "routing"
        mine.dismiss()
        mine.release()
        await wait_until(lambda: shared.resolve("m").state.value == "stopped", timeout=5)
        assert shared.resolve("m").start_count == 1


async def test_an_overtaken_view_is_not_shown(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _setup(tmp_path, {"m": _model(spawn_log)}, monkeypatch) as (controller, replica):
        one = await replica()
        for task in list(one._tasks):  # no sync replies meanwhile
            task.cancel()
        shared = await _shared(controller)
        mine = one.resolve("m")
        assert isinstance(mine, ReplicaRuntime)
        base = shared.view(shared.resolve("m"), time.monotonic())
        routing = dataclasses.replace(base, state="routing", port=1234)
        stopped = dataclasses.replace(base, state="stopped", port=None)
        mine.show(routing, 100, "run-1")
        mine.show(stopped, 99, "run-1")  # made before the one shown: overtaken
        assert mine.state.value == "routing" and mine.port == 1234
        mine.show(stopped, 1, "run-2")  # a restarted controller counts afresh
        assert mine.state.value == "stopped" and mine.port is None


async def test_a_replica_with_other_models_than_the_controller_says_so(
    tmp_path: Path,
    spawn_log: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _setup(tmp_path, {"m": _model(spawn_log)}, monkeypatch) as (controller, replica):
        await replica()
        assert "differs from the controller" not in caplog.text
        await controller.reload(_config(tmp_path, {"n": _model(spawn_log)}))
        await replica()  # started with the first file: its "m" is not the controller's
        assert "models only here: m; only there: n" in caplog.text
