#!/usr/bin/env bash
# The checks of oprd that need a GPU, as one script for a machine with one NVIDIA GPU (about 5 of
# the 8 minutes a lent machine gives; nothing is downloaded). Run from the repository root:
#
#     bash scripts/device_check.sh          # writes runs/device_check (or $OUT) and prints one table
#
#   1. each objective's smoke recipe (and the two applications'), 3 steps on CUDA in bf16, its losses next to
#      the CPU float32 run
#   2. the bench's CUDA peak-memory counters, on the tiny preset
#   3. the bench at the paper's Table 3 shape: r1-distill-1.5b with all 28 layers, float32 weights
#      under bf16 autocast as training runs, OPRD, top-16 OPD and OPD + OPRD against the floor,
#      4096 response tokens
#   4. the rehearsal's training step at Qwen3-0.6B's real shape (28 blocks, 151,936 rows, tied head;
#      random weights from `oprd make-model`, Qwen3's real tokenizer and chat template): OPRD on all
#      layers and full-vocabulary OPD, 4 prompts x 2 responses x 256 tokens sampled by transformers,
#      2 steps in bf16 with a checkpoint after the first
#
# oprd runs from src/ with the machine's own torch and transformers (no install step), so the
# versions it ran with are printed with the table. The real tokenizer and the prompts come from
# ../shared/data, or from shared/data in the working tree where ../shared is absent (a lent machine
# gets only the working tree: `bash scripts/device_check.sh prepare` copies the 25 MB there first).
# DEVICE=cpu R1_LAYERS=1 R1_TOKENS=64 Q_LAYERS=1 Q_TOKENS=16 runs the same plumbing on a CPU in a few
# minutes; tests/test_device_check.py also narrows RECIPES (the smoke recipes run), TINY_TOKENS,
# BENCH_REPEATS, the benches' methods (TINY_METHODS, R1_METHODS) and the objectives trained at
# Qwen3-0.6B's shape (Q_OBJECTIVES), and PRECISION=fp32 (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
R1_LAYERS=${R1_LAYERS:-28}
R1_TOKENS=${R1_TOKENS:-4096}
Q_LAYERS=${Q_LAYERS:-28}
RECIPES=${RECIPES:-oprd opd_sampled opd_topk opd_full oprd_plus_opd self_distillation multi_teacher}
Q_OBJECTIVES=${Q_OBJECTIVES:-oprd opd_full}
# bf16 autocast at the real shapes, as training runs on a GPU; the CPU dry run's fp32, since a CPU
# without native bf16 (no AVX512-BF16 or AMX) multiplies the 151,936-row heads in bf16 hundreds of times slower
PRECISION=${PRECISION:-bf16}
TINY_TOKENS=${TINY_TOKENS:-256}
Q_TOKENS=${Q_TOKENS:-256}
DATA=../shared/data
if [ "${1:-}" = prepare ]; then
  mkdir -p shared/data/tokenizers
  cp -r "$DATA/tokenizers/qwen3" shared/data/tokenizers/
  cp "$DATA/dapo_math_17k.parquet" shared/data/
  echo "copied the Qwen3 tokenizer and DAPO-Math-17K's prompts to shared/data"
  exit 0
fi
[ -d "$DATA/tokenizers/qwen3" ] || DATA=shared/data
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"

for recipe in $RECIPES; do
  "$PY" -m oprd train "recipes/smoke/$recipe.yaml" "output_dir=$OUT/gpu-$recipe" "device=$DEVICE" optim.precision=bf16 \
    save_every=0 overwrite=true > "$OUT/gpu-$recipe.log" 2>&1
  "$PY" -m oprd train "recipes/smoke/$recipe.yaml" "output_dir=$OUT/cpu-$recipe" device=cpu \
    save_every=0 overwrite=true > "$OUT/cpu-$recipe.log" 2>&1
done
"$PY" -m oprd bench --preset tiny --seq-lens "$TINY_TOKENS" --repeats "${BENCH_REPEATS:-2}" --device "$DEVICE" \
  --methods "${TINY_METHODS:-oprd,opd_top16,floor}" --out "$OUT/bench-tiny" --overwrite > "$OUT/bench-tiny.log" 2>&1
# as training runs on a GPU: float32 master weights under bf16 autocast (the chunked LM head's matmuls in
# bf16 on one copy of the head; OPD + OPRD keeping the blocks' states only in OPRD's 2,000-position window)
"$PY" -m oprd bench --preset r1-distill-1.5b --num-layers "$R1_LAYERS" --seq-len "$R1_TOKENS" --batch-size 1 \
  --repeats "${BENCH_REPEATS:-3}" --device "$DEVICE" --dtype float32 $( [ "$PRECISION" = bf16 ] && echo --autocast ) \
  --methods "${R1_METHODS:-oprd,opd_top16,oprd_plus_opd,floor}" --out "$OUT/bench-r1" --overwrite > "$OUT/bench-r1.log" 2>&1

rm -rf "$OUT/models"
for role in student:0 teacher:1; do
  "$PY" -m oprd make-model qwen3-0.6b "$OUT/models/${role%:*}" --tokenizer "$DATA/tokenizers/qwen3" \
    --seed "${role#*:}" --layers "$Q_LAYERS" > "$OUT/make-${role%:*}.log" 2>&1
done
for objective in $Q_OBJECTIVES; do
  "$PY" -m oprd train recipes/rehearsal/qwen3_0.6b.yaml "output_dir=$OUT/qwen3-$objective" "device=$DEVICE" \
    "student.model=$OUT/models/student" "teacher.model=$OUT/models/teacher" "data.path=$DATA/dapo_math_17k.parquet" \
    "rollout.max_new_tokens=$Q_TOKENS" "$( [ $objective = oprd ] && echo oprd.coef=1.0 || echo opd.objective=full )" \
    "optim.precision=$PRECISION" overwrite=true > "$OUT/qwen3-$objective.log" 2>&1
done

if "$PY" -c "import vllm" 2> /dev/null; then  # vLLM colocated on the GPU, sleeping between rollouts
  "$PY" -m oprd train recipes/smoke/oprd_plus_opd.yaml "output_dir=$OUT/gpu-vllm-colocate" "device=$DEVICE" \
    rollout.backend=vllm rollout.vllm_mode=colocate save_every=0 overwrite=true > "$OUT/gpu-vllm-colocate.log" 2>&1
else
  echo "vLLM is not installed on this machine (pip install -e '.[vllm]'): its checks are skipped" \
    | tee "$OUT/vllm-skipped.txt"
fi

"$PY" - "$OUT" "$RECIPES" "$Q_OBJECTIVES" <<'REPORT'
import json, platform, sys
from pathlib import Path

import torch
import transformers

out = Path(sys.argv[1])
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (a dry run of the plumbing)"
print(f"oprd device check: {device}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, Python {platform.python_version()}")
print()
print("| check | GPU bf16 | CPU float32 |")
print("|---|---|---|")
for recipe in sys.argv[2].split():
    runs = [[json.loads(line) for line in (out / f"{device}-{recipe}" / "metrics.jsonl").read_text().splitlines()]
            for device in ("gpu", "cpu")]
    cells = [" ".join(f"{row['loss']:.4f}" for row in rows) for rows in runs]
    print(f"| {recipe}: loss at steps 1-3 | {cells[0]} | {cells[1]} |")
colocated = out / "gpu-vllm-colocate" / "metrics.jsonl"
if colocated.is_file():
    rows = [json.loads(line) for line in colocated.read_text().splitlines()]
    losses = " ".join(f"{row['loss']:.4f}" for row in rows)
    lag = max(row["rollout/weight_version_lag"] for row in rows)
    print(f"| oprd_plus_opd through colocated vLLM: loss, weight-version lag | {losses}, lag {lag} | |")
for objective in sys.argv[3].split():
    rows = [json.loads(line) for line in (out / f"qwen3-{objective}" / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "models" / "student" / "config.json").read_text())
    cells = (" ".join(f"{row['loss']:.4f}" for row in rows), " ".join(f"{row['time/step_s']:.1f}" for row in rows),
             " ".join(f"{row['time/sample_s']:.1f}" for row in rows),
             max(row.get("memory/peak_allocated_gb", row["memory/peak_gb"]) for row in rows))
    print(f"| qwen3-0.6b shape ({config['num_hidden_layers']} blocks, real tokenizer), {objective}: loss, "
          f"s/step, of which sampling, peak GiB | {cells[0]}; {cells[1]} s; {cells[2]} s; {cells[3]:.1f} GiB | |")
for name in ("bench-tiny", "bench-r1"):
    bench = json.loads((out / name / "bench.json").read_text())
    for method, measured in bench["methods"].items():
        print(f"| {name} {bench['num_layers']} layers, {bench['seq_len']} tokens: {method} | "
              f"{measured['step_seconds']:.3f} s, {measured['peak_memory_delta_bytes'] / 2**30:.2f} GiB | |")
REPORT
