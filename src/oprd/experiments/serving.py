"""A vLLM server for the programs that measure through one (the rehearsal, the overlap timing),
started as docs/vllm.md says: reloadable in place, its head held apart from its embedding."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(python: Path, model: Path, log: IO, *, max_model_len: int, kv_cache_gib: float,
                 cpus: str | None = None) -> tuple[subprocess.Popen, str]:
    """`vllm serve` on `model` in float32 (as the trainer holds the student on a CPU), in a session of
    its own; pinned to `cpus` (taskset's list) where given. Returns the process and its URL."""
    port = free_port()
    pinned = ["taskset", "-c", cpus] if cpus else []
    process = subprocess.Popen(
        [*pinned, str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", "float32",
         "--enforce-eager", "--port", str(port), "--generation-config", "vllm", "--max-model-len", str(max_model_len),
         "--hf-overrides", json.dumps({"tie_word_embeddings": False})],
        env={**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
             "HF_HUB_OFFLINE": "1", **({"VLLM_CPU_OMP_THREADS_BIND": cpus} if cpus else {})},  # its threads there too
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_until_serving(process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not start: {log.read_text()[-3000:]}") from None
            time.sleep(2)


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
