"""Run by tests/test_vllm.py with the python of vLLM's CPU environment (oprd from src/): a colocated
engine (`ColocatedRollout`) for the smoke student, checked as the server is. Writes a JSON report
to argv[1]: whether the engine sleeps, the context it was sized for, and the largest difference
between vLLM's log-probs of its samples and the student's own, before and after the student's
weights change and are synced."""

import json
import sys
from pathlib import Path

import torch

from oprd.config import RolloutConfig
from oprd.distributed import ONE_PROCESS
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.rollout import SamplingParams, make_rollout

TINY = sys.argv[2]  # the test passes a tied model: the engine holds its head apart and loads it by name


def largest_difference(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits.float()
    start = batch.prompt_ids.shape[1]
    ours = torch.log_softmax(logits[:, start - 1 : -1], dim=-1).gather(-1, batch.response_ids.unsqueeze(-1))[..., 0]
    mask = batch.response_mask.bool()
    return float((ours[mask] - batch.sampled_logprobs[mask]).abs().max())


spec = ModelSpec(model=TINY, random_init=True, init_seed=0)
model, tokenizer = load_model(spec, torch.device("cpu")).eval(), load_tokenizer(spec)
# as the trainer builds it: sized for the run's longest sequence, not the model's 4,096 positions
rollout = make_rollout(RolloutConfig(backend="vllm", vllm_mode="colocate"), model, tokenizer, world=ONE_PROCESS,
                       workdir=Path(sys.argv[1]).parent, source=TINY, longest_sequence=256,
                       compute_dtype=torch.float32)
prompts = [tokenizer("What is 2 + 3?").input_ids, tokenizer("Name a prime larger than ten.").input_ids]
report = {"sleeps": rollout.sleeps, "max_model_len": rollout.llm.llm_engine.vllm_config.model_config.max_model_len}
rollout.sync_weights(model, version=0)
torch.manual_seed(0)
report["before"] = largest_difference(model, rollout.generate(prompts, SamplingParams(max_new_tokens=12, n=3)))
with torch.no_grad():
    for parameter in model.parameters():
        parameter.add_(0.05 * torch.randn_like(parameter))
rollout.sync_weights(model, version=1)
batch = rollout.generate(prompts, SamplingParams(max_new_tokens=12, n=3))
report["after"], report["version"] = largest_difference(model, batch), batch.weight_version
with open(sys.argv[1], "w") as out:
    json.dump(report, out)
