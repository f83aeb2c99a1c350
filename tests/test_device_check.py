"""scripts/device_check.sh, the one call a lent GPU gets, run here as its CPU dry run (every check at
one block and a few tokens, one smoke recipe, one objective at real width and the benches narrowed
to a method each): each of its steps must run and the table must have its rows, so the GPU's few
minutes are never spent on a broken script."""

import os
import subprocess

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_the_device_check_runs_through_on_a_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "check"), "DEVICE": "cpu", "R1_LAYERS": "1", "R1_TOKENS": "64",
           "Q_LAYERS": "1", "Q_TOKENS": "16", "Q_OBJECTIVES": "opd_full", "RECIPES": "oprd", "TINY_TOKENS": "32",
           "TINY_METHODS": "floor", "R1_METHODS": "oprd_plus_opd", "BENCH_REPEATS": "1", "OMP_NUM_THREADS": "2",
           "PRECISION": "fp32",  # bf16 at the real head's width: many minutes on a CPU without native bf16
           "PYTHON": "python"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    checks = [line.split(" | ")[0] for line in table[1:]]  # below the header
    assert [check for check in checks if check.endswith("loss at steps 1-3")] == ["| oprd: loss at steps 1-3"]
    (row,) = [line for line in table if line.startswith("| qwen3-0.6b shape (1 blocks, real tokenizer), ")]
    assert row.startswith("| qwen3-0.6b shape (1 blocks, real tokenizer), opd_full")  # the objective narrowed to
    losses = row.split(" | ")[1].split(";")[0].split()
    assert len(losses) == 2 and all(float(loss) == float(loss) for loss in losses)  # two steps, no NaN
    assert sum(line.startswith("| bench-") for line in table) == 2  # the methods the dry run narrows to
    config = (tmp_path / "check" / "models" / "student" / "config.json").read_text()
    assert '"vocab_size": 151936' in config and '"tie_word_embeddings": true' in config
