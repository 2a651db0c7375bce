"""Multipart uploads name their model in a form field: the official openai client's audio
transcriptions and image edits reach the right model, by name and by alias; a 20 MiB
upload does not make the manager hold it twice."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from llm_manager.errors import BadRequest
from llm_manager.gateway import forward
from llm_manager.gateway.multipart import FormModel, form_model, rename_form_model
from tests.conftest import RunningManager, fake_command, make_config, running_manager
from tests.test_server_process import launch, manager_procs, write_config  # noqa: F401

MODELS: dict[str, Any] = {
    "whisper-large-v3": {
        "aliases": ["whisper"],
        "schemes": {"CPU": {"command": fake_command()}},
    },
    "image-editor": {
        "aliases": ["gpt-image-1"],
        "schemes": {"CPU": {"command": fake_command()}},
    },
}


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def records(mgr: RunningManager) -> list[dict[str, Any]]:
    await asyncio.to_thread(mgr.app.db.flush)
    status, body = await mgr.get("/api/requests?limit=100")
    assert status == 200
    return list(reversed(body["requests"]))


def seen(answer: Any) -> dict[str, Any]:
    extra = answer.model_extra or {}
    assert "seen" in extra, answer
    return dict(extra["seen"])


# --- the official openai client -------------------------------------------------------------


async def test_transcriptions_and_image_edits_reach_the_named_model(tmp_path: Path) -> None:
    async with running_manager(make_config(tmp_path, MODELS)) as mgr, client(mgr.url) as ai:
        audio = b"RIFF" + bytes(range(256)) * 40
        for name in ("whisper-large-v3", "whisper"):
            answer = await ai.audio.transcriptions.create(
                model=name, file=("speech.wav", audio, "audio/wav"), language="en"
            )
            got = seen(answer)
            assert got["served_by"] == "whisper-large-v3"
            # An alias is replaced by the configured name, as in a JSON body.
            assert got["fields"]["model"] == "whisper-large-v3"
            assert got["fields"]["language"] == "en"
            assert got["files"]["file"] == {
                "bytes": len(audio),
                "sha256": hashlib.sha256(audio).hexdigest(),
            }
            assert answer.text == "transcribed by whisper-large-v3"

        image = b"\x89PNG\r\n\x1a\n" + b"\x00" * 5000
        for name in ("image-editor", "gpt-image-1"):
            edited = await ai.images.edit(
                model=name,
                image=("cat.png", image, "image/png"),
                prompt="a hat on the cat",
            )
            got = seen(edited)
            assert got["served_by"] == "image-editor"
            assert got["path"] == "/v1/images/edits"
            assert got["fields"]["model"] == "image-editor"
            assert got["fields"]["prompt"] == "a hat on the cat"
            assert got["files"]["image"]["sha256"] == hashlib.sha256(image).hexdigest()
            assert edited.data is not None and edited.data[0].b64_json == "aGVsbG8="

        rows = await records(mgr)
        forms = [r for r in rows if r["endpoint"] != "/health"]
        assert [r["model"] for r in forms] == ["whisper-large-v3"] * 2 + ["image-editor"] * 2
        assert all(r["status"] == 200 for r in forms)
        # The transcription answer's usage is recorded like any JSON answer's.
        assert forms[0]["prompt_tokens"] == 5 and forms[0]["completion_tokens"] == 3


def form_body(*parts: tuple[str, bytes, str | None], boundary: str = "b0und") -> bytes:
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


async def test_form_field_wins_over_query_and_query_is_the_fallback(tmp_path: Path) -> None:
    async with running_manager(make_config(tmp_path, MODELS)) as mgr:
        url = mgr.url + "/v1/audio/transcriptions"
        headers = {"Content-Type": "multipart/form-data; boundary=b0und"}
        wav = ("file", b"data", "a.wav")
        with_model = form_body(("model", b"whisper", None), wav)
        # The form names the model: it wins over ?model= (as a JSON body's "model" does).
        async with mgr.http.post(
            url + "?model=image-editor", data=with_model, headers=headers
        ) as r:
            assert r.status == 200
            assert (await r.json())["seen"]["served_by"] == "whisper-large-v3"
        # A form without a model field: ?model= names it, and the body goes unchanged.
        without = form_body(wav)
        async with mgr.http.post(url + "?model=whisper", data=without, headers=headers) as r:
            assert r.status == 200
            got = (await r.json())["seen"]
            assert got["served_by"] == "whisper-large-v3" and "model" not in got["fields"]
        # Neither: a clear 400 in OpenAI's envelope.
        async with mgr.http.post(url, data=without, headers=headers) as r:
            assert r.status == 400
        # An unknown model in the form: 404 as for a JSON body.
        unknown = form_body(("model", b"nope", None), wav)
        async with mgr.http.post(url, data=unknown, headers=headers) as r:
            assert r.status == 404
        # An empty model field: 400.
        empty = form_body(("model", b"", None), wav)
        async with mgr.http.post(url, data=empty, headers=headers) as r:
            assert r.status == 400
            assert "model" in (await r.json())["error"]["message"]


# --- the parser -------------------------------------------------------------------------------

CT = b"multipart/form-data; boundary=b0und"


def test_model_field_after_a_file_part_and_a_file_named_model() -> None:
    body = form_body(
        ("model", b"not-this: a file", "model.txt"),  # a file part named "model" is a file
        ("file", b"--b0un\r\n--b0und-ish\r\nbytes", "a.wav"),
        ("model", b"whisper", None),
    )
    field = form_model(body, CT)
    assert field is not None and field.name == "whisper"
    assert body[field.start : field.end] == b"whisper"
    renamed = rename_form_model(body, field, "whisper-large-v3")
    assert renamed == body.replace(b"\r\n\r\nwhisper\r\n", b"\r\n\r\nwhisper-large-v3\r\n")
    buffer = bytearray(body)  # a large body, read into one buffer: renamed in place
    assert rename_form_model(buffer, field, "whisper-large-v3") is buffer
    assert buffer == renamed


@pytest.mark.parametrize(
    "content_type",
    [
        b'multipart/form-data; boundary="b0und"',
        b"Multipart/Form-Data;boundary=b0und; charset=utf-8",
    ],
)
def test_boundary_forms(content_type: bytes) -> None:
    body = form_body(("model", "modèle".encode(), None))
    assert form_model(body, content_type) == FormModel(
        "modèle", body.index("modè".encode()), body.index(b"\r\n--b0und--")
    )


def test_unquoted_name_and_preamble() -> None:
    body = (
        b"preamble\r\n--b0und\r\ncontent-disposition: form-data; name=model\r\n\r\nm1\r\n--b0und--"
    )
    field = form_model(body, CT)
    assert field is not None and field.name == "m1"


def test_no_model_field_and_bad_forms() -> None:
    assert form_model(form_body(("file", b"x", "a.wav")), CT) is None
    assert form_model(b"", CT) is None
    assert form_model(b"--b0und\r\nno end of headers", CT) is None
    with pytest.raises(BadRequest):
        form_model(form_body(("model", b"x", None)), b"multipart/form-data")
    with pytest.raises(BadRequest):
        form_model(form_body(("model", b"\xff\xfe", None)), CT)
    with pytest.raises(BadRequest):
        form_model(form_body(("model", b"  ", None)), CT)


# --- memory -----------------------------------------------------------------------------------

UPLOAD = 20 * 1024 * 1024


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("name", ["whisper-large-v3", "whisper"])
def test_a_20_mib_upload_is_not_held_twice(
    tmp_path: Path,
    manager_procs: list[Any],  # noqa: F811
    name: str,
) -> None:
    """The manager runs as its own process; its peak RSS grows by about one copy of the
    upload (read once into one buffer, forwarded as it is), not two; by an alias too (the
    field is renamed in that buffer)."""
    config = write_config(tmp_path, {"whisper-large-v3": MODELS["whisper-large-v3"]})
    mgr = launch(config, tmp_path)
    manager_procs.append(mgr)
    with openai.OpenAI(base_url=mgr.url + "/v1", api_key="unused", max_retries=0) as ai:
        grown = upload(ai, mgr.proc.pid, name)
    print(f"manager peak RSS grew by {grown / 2**20:.1f} MiB for a {UPLOAD / 2**20:.0f} MiB upload")
    assert grown < 1.5 * UPLOAD, f"peak RSS grew by {grown / 2**20:.1f} MiB"
    assert psutil.Process(mgr.proc.pid).is_running()


def upload(ai: openai.OpenAI, pid: int, name: str) -> int:
    small = ai.audio.transcriptions.create(model=name, file=("s.wav", b"x" * 1000))
    assert seen(small)["served_by"] == "whisper-large-v3"
    before = peak_rss(pid)
    audio = io.BytesIO(b"\x01" * UPLOAD)
    answer = ai.audio.transcriptions.create(model=name, file=("big.wav", audio))
    got = seen(answer)
    assert got["files"]["file"]["bytes"] == UPLOAD
    assert got["fields"]["model"] == "whisper-large-v3"
    grown = peak_rss(pid) - before
    return grown


async def test_large_bodies_read_into_one_buffer_are_forwarded_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies of 8 MiB and more arrive in many messages and are read into one buffer:
    a large JSON body (renamed from its alias) and a large form reach the engine intact."""
    read_large = forward._read_large
    sizes: list[int] = []

    async def spy(*args: Any) -> bytes:
        body = await read_large(*args)
        sizes.append(len(body))
        return body

    monkeypatch.setattr(forward, "_read_large", spy)
    async with running_manager(make_config(tmp_path, MODELS)) as mgr:
        text = "x" * (9 * 1024 * 1024)
        payload = {"model": "whisper", "input": text}
        raw = io.BytesIO(json.dumps(payload).encode())
        json_type = {"Content-Type": "application/json"}
        async with mgr.http.post(mgr.url + "/v1/echo", data=raw, headers=json_type) as resp:
            assert resp.status == 200
            echoed = json.loads((await resp.json())["body"])
        assert echoed == {"model": "whisper-large-v3", "input": text}

        audio = bytes(range(256)) * (36 * 1024)  # 9 MiB
        body = form_body(("model", b"whisper", None), ("file", audio, "a.wav"))
        headers = {"Content-Type": "multipart/form-data; boundary=b0und"}
        url = mgr.url + "/v1/audio/transcriptions"
        async with mgr.http.post(url, data=io.BytesIO(body), headers=headers) as resp:
            assert resp.status == 200
            got = (await resp.json())["seen"]
        assert got["fields"]["model"] == "whisper-large-v3"
        assert got["files"]["file"]["sha256"] == hashlib.sha256(audio).hexdigest()
    assert len(sizes) == 2 and min(sizes) > 9 * 1024 * 1024  # both took the one-buffer path
