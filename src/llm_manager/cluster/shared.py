"""What gateway replicas and the cluster's controller tell each other (docs/replicas.md).

A replica reports, every SYNC_PERIOD, its request counts per model and the newest reply
it has applied; the controller answers with every model's view and the model log lines
the replica has not seen. Replies are stamped in the order the controller made them: a
replica applies a model's view only when it is newer than the one it has, so a reply that
was overtaken (a sync sent before an ``ensure`` answered) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_manager import errors
from llm_manager.config import SchemeConfig
from llm_manager.errors import ManagerError
from llm_manager.models.launch import Launch
from llm_manager.models.scheduler import Fit

SYNC_PERIOD = 0.25  # seconds between a replica's reports
# A replica that has not reported for this long is taken to be gone: its requests stop
# counting (a SIGKILLed replica), and the controller stops waiting for its word.
REPLICA_TTL = 3.0
# With no replica left for this long, the controller stops every model and ends.
ORPHAN_SECONDS = 30.0
LOG_LINES_PER_REPLY = 2000


@dataclass(frozen=True, slots=True)
class Counts:
    """One model's requests on one replica."""

    pending: int  # waiting or in flight
    admitted: int  # past the turn door
    requests: int  # begun since the replica started (a rise = used since the last report)


@dataclass(frozen=True, slots=True)
class Report:
    replica: str  # unique id of the replica's run
    label: str  # where it is, for people: host:port
    seen: int  # the stamp of the newest reply applied before this report was made
    counts: dict[str, Counts]
    log_marks: dict[str, int]  # per model, the controller's log seq last copied
    # Per model, an Ollama keep_alive set on the replica since its last report (the idle
    # timeout of that run, with the run's start count), or None when it was cleared.
    keep_alive: dict[str, tuple[float, int] | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelView:
    """What a replica shows and routes by, of one model run by the controller."""

    state: str
    draining: bool  # being stopped as unused: ask the controller, do not route
    host: str
    port: int | None
    auth: str | None  # the engine's Authorization header ({api_key}), or None
    scheme: str | None
    node: str | None
    pid: int | None
    failure_reason: str | None
    stop_reason: str | None
    stops: int
    start_count: int
    crash_count: int
    node_losses: int
    last_start_seconds: float | None
    turn_left: float | None  # seconds until its turn ends (another model waits), or None
    waiting_for: tuple[str, ...]
    booked: dict[str, int]
    placed_on: dict[str, str]
    idle_seconds: float
    memory_now: dict[str, int]  # its engine's latest memory reading, by device key


@dataclass(frozen=True, slots=True)
class Line:
    seq: int
    timestamp: float
    stream: str
    message: str
    level: str


@dataclass(frozen=True, slots=True)
class SyncReply:
    epoch: str  # the controller's run: a new one (restarted) starts the stamps afresh
    stamp: int
    models: dict[str, ModelView]
    logs: dict[str, list[Line]] = field(default_factory=dict)
    replicas: int = 0  # live replicas, this one included


@dataclass(frozen=True, slots=True)
class Failure:
    """A ManagerError carried across processes (its class by name)."""

    kind: str
    message: str
    detail: str | None
    headers: dict[str, str]

    @classmethod
    def of(cls, exc: ManagerError) -> Failure:
        return cls(type(exc).__name__, exc.message, exc.detail, dict(exc.headers))

    def error(self) -> ManagerError:
        kind = getattr(errors, self.kind, None)
        if not (isinstance(kind, type) and issubclass(kind, ManagerError)):
            kind = errors.ModelUnavailable
        exc = kind.__new__(kind)
        ManagerError.__init__(exc, self.message, self.detail)
        if self.headers:
            exc.headers = dict(self.headers)
        return exc


@dataclass(frozen=True, slots=True)
class Answer:
    """The controller's answer to ensure/stop: the model's view, or why not."""

    epoch: str
    stamp: int
    view: ModelView | None
    failure: Failure | None = None
    stopped: bool = False


@dataclass(frozen=True, slots=True)
class Kept:
    """What the controller leaves with an engine's host once the engine is ready, to adopt
    it again if the controller is restarted (cluster/ray_backend.py, ``keep_hosts``)."""

    model: str
    fit: Fit
    launch: Launch
    port: int
    node: str
    scheme: SchemeConfig  # as configured then: a changed one is not adopted
