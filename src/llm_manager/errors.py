"""Domain errors. The HTTP edge (api/errors.py) maps them to status codes and shapes."""

from __future__ import annotations


class ManagerError(Exception):
    """Base of every error LLM-Manager reports to a client. ``status`` is the HTTP code."""

    status = 500
    kind = "internal_error"
    headers: dict[str, str] = {}  # noqa: RUF012 - read-only class default

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class BadRequest(ManagerError):
    status = 400
    kind = "invalid_request_error"


class BodyTooLarge(ManagerError):
    status = 413
    kind = "invalid_request_error"


class MethodNotAllowed(ManagerError):
    status = 405
    kind = "invalid_request_error"


class Forbidden(ManagerError):
    status = 403
    kind = "permission_error"


class RouteNotFound(ManagerError):
    status = 404
    kind = "not_found_error"


class QueueFull(ManagerError):
    """A model's max_concurrency is reached and its queue is full."""

    status = 429
    kind = "rate_limit_error"
    headers = {"Retry-After": "1"}  # noqa: RUF012


class ModelNotFound(ManagerError):
    status = 404
    kind = "model_not_found"

    def __init__(self, name: str, known: list[str], ambiguous: list[str] | None = None) -> None:
        self.name = name
        self.known = known
        if ambiguous:
            message = f"model {name!r} is ambiguous: it matches {', '.join(ambiguous)}"
        else:
            message = f"model {name!r} not found"
        super().__init__(message, "known models: " + (", ".join(known) or "(none)"))


class ModelUnavailable(ManagerError):
    """The model cannot be started: devices, resources, port, or a failed start."""

    status = 503
    kind = "model_unavailable"


class DeviceUnavailable(ModelUnavailable):
    kind = "device_unavailable"


class StartFailed(ModelUnavailable):
    kind = "start_failed"


class ModelBusy(DeviceUnavailable):
    """The model waited for room past its queue_timeout: the models holding it stayed busy."""

    kind = "model_busy"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, round(retry_after)))}


class StorageUnavailable(ManagerError):
    """The SQLite file cannot be read or written; serving goes on without it."""

    status = 503
    kind = "storage_unavailable"


class ModelStopped(ManagerError):
    """The model was stopped or died while a request waited for or used it."""

    status = 502
    kind = "model_stopped"


class UpstreamFailed(ManagerError):
    """The model server refused, dropped or broke the connection."""

    status = 502
    kind = "upstream_error"


class UpstreamTimeout(ManagerError):
    status = 504
    kind = "timeout_error"
