"""Gradient checkpointing with oprd's capture hooks, run under whichever transformers this Python has.

`python tests/checkpointing_worker.py` prints the largest difference between a student's gradients
through `capture_hidden` with and without `gradient_checkpointing_enable`, and exits 0 when they are
equal. test_capture.py checks it under this environment's transformers, test_vllm.py under vLLM's
5.19, the oldest we allow.
"""

from __future__ import annotations

import sys

import torch
import transformers
from transformers import AutoModelForCausalLM

from oprd.capture import capture_hidden
from oprd.testing import tiny_config


def gradients(checkpointed: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(256, num_layers=4)).train()
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(10).expand(2, 10)}
    keep_B_S = torch.zeros(2, 10, dtype=torch.bool)
    keep_B_S[:, -4:] = True
    states = capture_hidden(model, inputs, [1, 2, 4], keep_B_S, final=True)
    sum(h.pow(2).mean() for h in states.values()).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def largest_gradient_difference() -> float:
    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0, "no gradients reached the parameters"
    return max((plain[k] - checkpointed[k]).abs().max().item() for k in plain)


if __name__ == "__main__":
    worst = largest_gradient_difference()
    print(f"transformers {transformers.__version__}: largest gradient difference {worst:.3g}")
    sys.exit(0 if worst <= 1e-6 else 1)
