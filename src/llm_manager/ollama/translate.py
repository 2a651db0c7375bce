"""Ollama request bodies to OpenAI ones, and OpenAI answers (whole or streamed) back.

Pure functions and small accumulators; no I/O.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llm_manager.gateway.usage import Usage

# Ollama ``options`` with an OpenAI (or llama.cpp server) request field of their own.
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "typical_p": "typical_p",
}


class Invalid(ValueError):
    """The Ollama request cannot be translated: 400."""


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(time.time())


def _options(body: dict[str, Any], out: dict[str, Any]) -> None:
    options = body.get("options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise Invalid("'options' must be an object")
    for key, target in _OPTIONS.items():
        value = options.get(key)
        if value is None:
            continue
        if key == "num_predict" and isinstance(value, int) and value < 0:
            continue  # -1 = no limit
        out[target] = value


def _format(body: dict[str, Any], out: dict[str, Any]) -> None:
    fmt = body.get("format")
    if fmt in (None, ""):
        return
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": fmt, "strict": True},
        }
    else:
        raise Invalid("'format' must be \"json\" or a JSON schema")


def _message(message: object) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise Invalid("each message must be an object with a 'role'")
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise Invalid("a message's 'content' must be a string")
    out: dict[str, Any] = {"role": message["role"]}
    images = message.get("images") or []
    if images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
        for image in images:
            if not isinstance(image, str):
                raise Invalid("images must be base64 strings")
            url = image if image.startswith("data:") else f"data:image/png;base64,{image}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        out["content"] = parts
    else:
        out["content"] = content
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [
            {
                "id": call.get("id") or f"call_{index}",
                "type": "function",
                "function": {
                    "name": call.get("function", {}).get("name", ""),
                    "arguments": json.dumps(call.get("function", {}).get("arguments") or {}),
                },
            }
            for index, call in enumerate(calls)
            if isinstance(call, dict)
        ]
    if message.get("tool_name") and message["role"] == "tool":
        out["name"] = message["tool_name"]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    return out


def chat_request(body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise Invalid("'messages' must be a list")
    out: dict[str, Any] = {
        "model": model,
        "messages": [_message(m) for m in messages],
        "stream": stream,
    }
    if stream:
        out["stream_options"] = {"include_usage": True}
    tools = body.get("tools")
    if tools:
        out["tools"] = tools
    _options(body, out)
    _format(body, out)
    return out


def generate_request(body: dict[str, Any], model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """The OpenAI path and body: /v1/completions for ``raw`` prompts, else a chat turn."""
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise Invalid("'prompt' must be a string")
    out: dict[str, Any] = {"model": model, "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    _options(body, out)
    _format(body, out)
    if body.get("raw"):
        out["prompt"] = prompt
        return "/v1/completions", out
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    messages.append(_message({"role": "user", "content": prompt, "images": body.get("images")}))
    out["messages"] = messages
    return "/v1/chat/completions", out


def embed_input(body: dict[str, Any], legacy: bool) -> str | list[str]:
    value = body.get("prompt") if legacy else body.get("input")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and not legacy:
        return value
    if legacy:
        raise Invalid("'prompt' must be a string")
    raise Invalid("'input' must be a string or a list of strings")


def _ns(ms: object) -> int | None:
    return int(ms * 1_000_000) if isinstance(ms, int | float) and not isinstance(ms, bool) else None


@dataclass
class Answer:
    """What an OpenAI answer said, gathered whole or chunk by chunk."""

    text: str = ""
    thinking: str = ""
    done_reason: str = "stop"
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)

    def take_choice(self, choice: dict[str, Any], delta_key: str) -> tuple[str, str]:
        """Fold one choice (a streamed delta or a whole message) in; the new text."""
        part = choice.get(delta_key)
        text = thinking = ""
        if isinstance(part, dict):
            text = part.get("content") or ""
            thinking = part.get("reasoning_content") or ""
            for index, call in enumerate(part.get("tool_calls") or []):
                slot = self.tool_calls.setdefault(
                    call.get("index", index), {"id": None, "name": "", "arguments": ""}
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
        elif isinstance(choice.get("text"), str):  # /v1/completions
            text = choice["text"]
        self.text += text
        self.thinking += thinking
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self.done_reason = "stop" if reason == "tool_calls" else reason
        return text, thinking

    def take(self, event: dict[str, Any], delta_key: str) -> tuple[str, str]:
        if isinstance(event.get("timings"), dict):
            self.timings = event["timings"]
        choices = event.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            return self.take_choice(choices[0], delta_key)
        return "", ""

    def ollama_tool_calls(self) -> list[dict[str, Any]]:
        calls = []
        for _, call in sorted(self.tool_calls.items()):
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                arguments = {"_raw": call["arguments"]}
            calls.append({"function": {"name": call["name"], "arguments": arguments}})
        return calls


def final_fields(usage: Usage, answer: Answer, began: float, load_seconds: float) -> dict[str, Any]:
    """``done`` and the counters of an answer's last object (durations in nanoseconds)."""
    total = int((time.perf_counter() - began) * 1e9)
    fields: dict[str, Any] = {
        "done": True,
        "done_reason": answer.done_reason,
        "total_duration": total,
        "load_duration": int(load_seconds * 1e9),
    }
    if usage.prompt_tokens is not None:
        fields["prompt_eval_count"] = usage.prompt_tokens
    prompt_ns = _ns(answer.timings.get("prompt_ms"))
    if prompt_ns is not None:
        fields["prompt_eval_duration"] = prompt_ns
    if usage.completion_tokens is not None:
        fields["eval_count"] = usage.completion_tokens
    eval_ns = _ns(answer.timings.get("predicted_ms"))
    fields["eval_duration"] = eval_ns if eval_ns is not None else max(0, total - (prompt_ns or 0))
    return fields
