"""Human-readable messages of the management API in the configured language (en | zh).

The seed document's API answered in Chinese; ``server.language: zh`` restores that.
"""

from __future__ import annotations

_TEXT: dict[str, dict[str, str]] = {
    "started": {"en": "model '{name}' started", "zh": "模型 '{name}' 启动成功"},
    "already_running": {"en": "model '{name}' is already running", "zh": "模型 '{name}' 已在运行"},
    "stopped": {"en": "model '{name}' stopped", "zh": "模型 '{name}' 停止成功"},
    "not_running": {"en": "model '{name}' was not running", "zh": "模型 '{name}' 未在运行"},
    "stopped_all": {"en": "all models stopped", "zh": "所有模型已关闭"},
    "restarted": {
        "en": "restarted {count} autostart model(s)",
        "zh": "已重启 {count} 个autostart模型",
    },
    "logs_cleared": {
        "en": "model '{name}': deleted {count} log line(s) older than {minutes} minutes",
        "zh": "模型 '{name}' 已清理 {minutes} 分钟前的日志，删除 {count} 条",
    },
    "memory_forgotten": {
        "en": "model '{name}': forgot {count} measured footprint(s); the next runs measure afresh",
        "zh": "模型 '{name}' 已清除 {count} 条内存测量记录，之后的运行将重新测量",
    },
    "device_unavailable": {
        "en": "device unavailable or insufficient resources",
        "zh": "设备不可用或资源不足",
    },
}


class Messages:
    def __init__(self, language: str) -> None:
        self.language = language if language in ("en", "zh") else "en"

    def __call__(self, key: str, **values: object) -> str:
        return _TEXT[key][self.language].format(**values)
