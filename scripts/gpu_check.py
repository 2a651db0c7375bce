"""The GPU check, run on a machine with an NVIDIA GPU (the device tool): a real manager
reads the GPU through NVML, starts a model on a `cuda:0` scheme (a PyTorch allocation of
1 GiB stands in for a model server), shows the model's own GPU memory by PID and its
measured footprint (info's ``memory``), starts a model that declares too little and runs out
of GPU memory (the manager evicts the idle model, tries once more, and fails with what the
GPU held), evicts the first model for a big one, and stops on SIGTERM. Prints everything it
sees.

    PYTHONPATH=src python3 scripts/gpu_check.py

The device's Python has no FastAPI, uvicorn or pydantic: bring wheels for every entry of
pyproject.toml's ``dependencies`` it lacks, pysimdjson among them since 3a95ec3, built for its
Python (``pip download --only-binary=:all: --python-version 3.12 -d wheels ...``), and
install them there with ``pip install --no-index wheels/*.whl`` before this script.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_MODEL = ROOT / "tests" / "fakes" / "gpu_model.py"


def call(url: str, path: str, method: str = "GET") -> dict:
    req = urllib.request.Request(url + path, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return {"http_status": exc.code, **json.loads(exc.read())}


def show(title: str, data: object) -> None:
    print(f"\n=== {title}\n{json.dumps(data, indent=2, ensure_ascii=False)}", flush=True)


def smi() -> None:
    for query in (
        "--query-gpu=index,name,memory.total,memory.used,memory.free",
        "--query-compute-apps=pid,used_memory",
    ):
        out = subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True)
        print(f"\n=== nvidia-smi {query}\n{out.stdout.strip()}", flush=True)


def main() -> int:
    tmp = Path(tempfile.mkdtemp())
    model = [sys.executable, str(GPU_MODEL), "--port", "{port}", "--mib"]
    free = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    big_need = int(free) - 1000  # fits only once gpu-small's memory is given back
    print(f"GPU 0 free before: {free} MiB; gpu-big will need {big_need} MiB")
    config = {
        "server": {"data_dir": str(tmp / "data"), "startup_timeout": "120s"},
        "models": {
            # "nvidia h" matches an H100 or H200 by name. The first fits; the second needs nearly
            # the whole card, so it must evict the first and wait for its memory to free.
            "gpu-small": {
                "schemes": {"GPU": {"devices": {"cuda:0": 2000}, "command": model + ["1024"]}}
            },
            # Declares 1000 MiB but allocates more than the GPU has: PyTorch's CUDA OOM.
            "gpu-oom": {
                "schemes": {
                    "GPU": {"devices": {"cuda:0": 1000}, "command": model + [str(int(free) + 4096)]}
                }
            },
            "gpu-big": {
                "schemes": {"GPU": {"devices": {"nvidia h": big_need}, "command": model + ["2048"]}}
            },
        },
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    log = tmp / "manager.log"
    with log.open("wb") as out:
        manager = subprocess.Popen(
            [sys.executable, "-m", "llm_manager", "serve", "--config", str(path), "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = None
    for _ in range(300):
        found = re.search(r"listening on (http://[\d.]+:\d+)", log.read_text())
        if found:
            url = found.group(1)
            break
        time.sleep(0.1)
    if url is None:
        print(log.read_text())
        return 1
    try:
        show("GET /api/devices/info (nothing started)", call(url, "/api/devices/info"))
        began = time.monotonic()
        show("POST /api/models/gpu-small/start", call(url, "/api/models/gpu-small/start", "POST"))
        print(f"started in {time.monotonic() - began:.1f} s")
        time.sleep(2.5)  # one device poll interval
        show("GET /api/devices/info (gpu-small running)", call(url, "/api/devices/info"))
        show("GET /api/models/gpu-small/info", call(url, "/api/models/gpu-small/info"))
        smi()
        began = time.monotonic()
        show("POST /api/models/gpu-oom/start", call(url, "/api/models/gpu-oom/start", "POST"))
        print(f"answered in {time.monotonic() - began:.1f} s")
        show("GET /api/models/all-models/info", call(url, "/api/models/all-models/info"))
        show("POST /api/models/gpu-small/start", call(url, "/api/models/gpu-small/start", "POST"))
        began = time.monotonic()
        show("POST /api/models/gpu-big/start", call(url, "/api/models/gpu-big/start", "POST"))
        print(f"started in {time.monotonic() - began:.1f} s")
        show("GET /api/models/all-models/info", call(url, "/api/models/all-models/info"))
        time.sleep(2.5)
        show("GET /api/devices/info (gpu-big running)", call(url, "/api/devices/info"))
        show("POST /api/models/stop-all", call(url, "/api/models/stop-all", "POST"))
        time.sleep(2.5)
        show("GET /api/devices/info (all stopped)", call(url, "/api/devices/info"))
    finally:
        manager.send_signal(signal.SIGTERM)
        code = manager.wait(60)
        print(f"\nmanager exit status after SIGTERM: {code}")
        print("\n=== manager log\n" + log.read_text()[-6000:])
        smi()
    return 0


if __name__ == "__main__":
    sys.exit(main())
