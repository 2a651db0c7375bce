#!/usr/bin/env bash
# Start script of the "two-gpus" scheme of Qwen3-Coder-30B in docs/example-config.yaml.
#
# LLM-Manager runs it with bash (it ends in .sh) and passes, in the environment:
#   LLM_MANAGER_MODEL  the model's name
#   LLM_MANAGER_PORT   the port the server must listen on
#   LLM_MANAGER_HOST   127.0.0.1, the address the manager probes
# plus the scheme's env (CUDA_VISIBLE_DEVICES, MODEL_DIR here).
#
# `exec` makes the server replace this shell, so the process LLM-Manager watches and
# stops is the server itself.
set -euo pipefail

exec llama-server \
  -m "${MODEL_DIR:-/models}/Qwen3-Coder-30B-A3B-Instruct-UD-Q4_K_XL.gguf" \
  --host "$LLM_MANAGER_HOST" --port "$LLM_MANAGER_PORT" \
  -a "$LLM_MANAGER_MODEL" \
  -ngl 99 --tensor-split 6,14 -c 65536 -np 1
