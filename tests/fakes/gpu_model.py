"""A stand-in model server that holds GPU memory: a PyTorch allocation of a known size on
the GPU it was given (CUDA_VISIBLE_DEVICES), then OpenAI-style /health and /v1/models."""

from __future__ import annotations

import argparse
import os

import torch
from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mib", type=int, default=1024)
    args = p.parse_args()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    block = torch.empty(args.mib * 1024 * 1024, dtype=torch.uint8, device="cuda")
    block.fill_(1)
    torch.cuda.synchronize()
    print(
        f"CUDA_VISIBLE_DEVICES={visible} holding {args.mib} MiB on {torch.cuda.get_device_name(0)}",
        flush=True,
    )

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "held": int(block.numel() >> 20)})

    app = web.Application()
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
