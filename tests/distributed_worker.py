"""Run under `torchrun --nproc-per-node 2` by tests/test_distributed.py (not a test module itself).

The sharded engine (FSDP2 on gloo) against one process on the same global batches: for each
objective, 3 AdamW steps of `trainer.update`, where each process holds half of every batch and a
shard of both models, next to the same steps on unsharded copies holding the whole batch. Also
sampling from the sharded student with response lengths that differ between the processes.
Writes its findings to argv[1]/rank{r}.json; the test reads and judges them.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from helpers import SMOKE, keep_gradients, trained_models, update_run

from oprd import distributed
from oprd.config import load_config
from oprd.data import PromptSet, load_problems
from oprd.distributed import ONE_PROCESS
from oprd.evaluation.harness import evaluate
from oprd.models import decoder_layers, load_tokenizer
from oprd.rollout import HFRollout, SamplingParams
from oprd.trainer import update

OBJECTIVES = {  # name -> (recipe, overrides)
    "oprd_early_stop": ("oprd.yaml", ["oprd.layers=[1,2]", "oprd.positions=all"]),  # blocks 3-4 never run
    "opd_topk": ("opd_topk.yaml", ["opd.k=8"]),
    "opd_sampled": ("opd_sampled.yaml", []),
    "both_checkpointed_full_teacher": ("oprd_plus_opd.yaml", ["optim.gradient_checkpointing=true",
                                                              "teacher.shard=false"]),
    # prompt 0 goes to the first teacher and prompt 1 to the second: each process holds one prompt's rows,
    # so each sharded teacher runs in step on a process that has no sample for it
    "two_teachers_routed": ("multi_teacher.yaml", []),
    "self_ema": ("self_distillation.yaml", ["teacher.self_mode=ema", "teacher.ema_decay=0.5"]),
    # the LM head is the embedding (Qwen3-0.6B/1.7B/4B): both uses reach one sharded parameter's gradient
    "opd_full_tied": ("opd_full.yaml", [f"{role}.model={SMOKE / 'tiny-qwen3-tied'}"
                                        for role in ("student", "teacher")]),
    # micro-batches by token budget, set each step so that one process needs more micro-batches than the other
    "both_by_token_budget": ("oprd_plus_opd.yaml", []),
    "both_packed_by_token_budget": ("oprd_plus_opd.yaml", ["optim.pack_sequences=true"]),
}
BY_TOKENS = {"both_by_token_budget", "both_packed_by_token_budget"}


def smaller_half(batch, halves: int, packed: bool) -> int:
    """The tokens of the smallest process's share of `batch` as one micro-batch, counted as the token
    budget counts them: as the budget, that process runs one micro-batch and one with longer rows two or more."""
    share = batch.response_ids.shape[0] // halves
    lengths = batch.prompt_mask.sum(1) + batch.response_lengths.clamp(min=1)
    return min(int(lengths[i * share:(i + 1) * share].sum()) if packed else
               batch.select(slice(i * share, (i + 1) * share)).attention_mask.numel() for i in range(halves))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check_objective(name, world, tokenizer, prompts, out):
    recipe, overrides = OBJECTIVES[name]
    cfg = load_config(SMOKE / recipe, [*overrides, "optim.grad_clip=0.5"])
    sharded_run, single_run = update_run(cfg, world, tokenizer, out), update_run(cfg, ONE_PROCESS, tokenizer, out)
    grads = {"sharded": keep_gradients(sharded_run), "single": keep_gradients(single_run)}
    sampler = single_run.sampler.rollout  # synced by every update: its batches carry the right weight version
    report = {"loss": [], "grad_norm": [], "lr": []}
    groups = []  # with a token budget: this process's micro-batches each step, before they are evened out
    upper_blocks_ran = []
    for block in decoder_layers(sharded_run.student)[2:]:
        block.register_forward_pre_hook(lambda module, args: upper_blocks_ran.append(1))
    for step in range(1, 4):
        torch.manual_seed(100 + step)  # the same global batch on every process
        batch = sampler.generate(prompts, SamplingParams(n=2, max_new_tokens=10))
        half = batch.response_ids.shape[0] // world.size
        mine = batch.select(slice(world.rank * half, (world.rank + 1) * half))
        if name in BY_TOKENS:
            budget = smaller_half(batch, world.size, cfg.optim.pack_sequences)
            for run in (sharded_run, single_run):
                run.cfg = replace(cfg, optim=replace(cfg.optim, micro_batch_tokens=budget))
            groups.append(len(mine.token_budget_groups(budget, cfg.optim.pack_sequences)))
        sharded = update(sharded_run, mine, step, {})
        single = update(single_run, batch, step, {})
        for key in report:
            report[key].append([sharded[key], single[key]])
    report["grad_difference_step_1"] = max_difference(grads["sharded"]["first"], grads["single"]["first"])
    report["upper_blocks_ran"] = len(upper_blocks_ran)
    report["groups"] = groups
    weights = distributed.full_model_state(sharded_run.student)
    if world.main:
        reference = {k: v for k, v in single_run.student.state_dict().items() if k in weights}
        report["weight_difference_step_3"] = max_difference(weights, reference)
    return report


def check_generation(world, tokenizer, prompts):
    """Sampling from the sharded student, each process with its own response length: the same
    tokens as one process sampling alone, and no process waits forever for the other."""
    cfg = load_config(SMOKE / "oprd.yaml")
    sharded, _ = trained_models(cfg, world, tokenizer)
    single, _ = trained_models(cfg, ONE_PROCESS, tokenizer)
    length = 3 + 8 * world.rank
    got, want = [], []
    rollouts = ((HFRollout.for_model(sharded, tokenizer), got), (HFRollout.for_model(single, tokenizer), want))
    for rollout, out in rollouts:
        torch.manual_seed(7 + world.rank)
        for _ in range(2):  # a second call after the first has resharded
            batch = rollout.generate([prompts[world.rank]], SamplingParams(n=2, max_new_tokens=length))
            out.append(batch.response_ids.tolist())
    return {"sharded": got, "single": want, "max_new_tokens": length,
            "synced": HFRollout.for_model(sharded, tokenizer).synced}


def check_validation(world, tokenizer):
    """Evaluation of the sharded student, each process sampling its share of 5 problems greedily:
    every process gets the whole result, the one process's, problem by problem."""
    cfg = load_config(SMOKE / "oprd.yaml")
    sharded, _ = trained_models(cfg, world, tokenizer)
    single, _ = trained_models(cfg, ONE_PROCESS, tokenizer)
    problems = load_problems("aime24", limit=5)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    rollout, sampled = HFRollout.for_model(sharded, tokenizer), []
    generate = rollout.generate
    rollout.generate = lambda prompts, params: sampled.append(len(prompts)) or generate(prompts, params)
    split = evaluate(rollout, tokenizer, problems, greedy, batch_size=1, world=world)  # no padding: exact
    whole = evaluate(HFRollout.for_model(single, tokenizer), tokenizer, problems, greedy, batch_size=1)
    return {"split": split.samples, "whole": whole.samples, "prompts_sampled": sum(sampled)}


def main() -> None:
    out = Path(sys.argv[1])
    world, _ = distributed.init("cpu")
    tokenizer = load_tokenizer(load_config(SMOKE / "oprd.yaml").student)
    problems = load_problems(str(SMOKE / "prompts.parquet"), limit=2)
    prompts = PromptSet.render(problems, tokenizer).student
    report = {"world_size": world.size, "generation": check_generation(world, tokenizer, prompts),
              "validation": check_validation(world, tokenizer)}
    for name in OBJECTIVES:
        report[name] = check_objective(name, world, tokenizer, prompts, out)
    (out / f"rank{world.rank}.json").write_text(json.dumps(report))
    distributed.close()


if __name__ == "__main__":
    main()
