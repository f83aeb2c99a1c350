"""Run under `torchrun --nproc-per-node 2` by tests/test_distributed.py (not a test module itself).

The sharded engine (FSDP2 on gloo) against one process on the same global batches: for each
objective, 3 AdamW steps of `trainer.update`, where each process holds half of every batch and a
shard of both models, next to the same steps on unsharded copies holding the whole batch. Also
sampling from the sharded student with response lengths that differ between the processes.
Writes its findings to argv[1]/rank{r}.json; the test reads and judges them.
"""

import json
import sys
from pathlib import Path

import torch
from helpers import SMOKE

from oprd import distributed
from oprd.config import load_config, teacher_sources
from oprd.data import PromptSet, PromptStream, load_problems
from oprd.distributed import ONE_PROCESS
from oprd.evaluation.harness import evaluate
from oprd.models import decoder_layers, load_tokenizer
from oprd.objective import LossPlan
from oprd.optim import make_optimizer
from oprd.rollout import HFRollout, Sampler, SamplingParams
from oprd.runs.recorder import RunRecorder
from oprd.teachers import Routing
from oprd.trainer import Run, load_models, update

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
}


def models(cfg, plan, world):
    """What the trainer loads: sharded under several processes, the OPRD-only teacher cut short."""
    sources = teacher_sources(cfg)
    return load_models(cfg, torch.device("cpu"), world, None, sources, [plan for _ in sources])


def make_run(cfg, world, student, teachers, tokenizer, out):
    optimizer, scheduler = make_optimizer(cfg, student)
    rollout = HFRollout.for_model(student, tokenizer)
    sampler = Sampler(rollout, PromptSet([[1]]), tokenizer, tokenizer, torch.device("cpu"))
    weights = tuple(teacher.source.weight for teacher in teachers)
    routing = Routing(torch.tensor([0, 1]) if cfg.teachers.route_by else None, weights)  # prompt i -> teacher i
    return Run(cfg=cfg, world=world, run_dir=out, recorder=RunRecorder(out), device=torch.device("cpu"),
               student=student, teachers=teachers, routing=routing, tokenizer=tokenizer, sampler=sampler,
               sampling=SamplingParams(), optimizer=optimizer, scheduler=scheduler, stream=PromptStream(1, 1, 0),
               start_step=0, validation=None)


def full_grads(model):
    return {name: distributed.full_value(p.grad).clone() for name, p in model.named_parameters() if p.grad is not None}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check_objective(name, world, tokenizer, prompts, out):
    recipe, overrides = OBJECTIVES[name]
    cfg = load_config(SMOKE / recipe, [*overrides, "optim.grad_clip=0.5"])
    plan = LossPlan.from_config(cfg.opd, cfg.oprd, 4, 4, len(tokenizer))
    sharded_run = make_run(cfg, world, *models(cfg, plan, world), tokenizer, out)
    single_run = make_run(cfg, ONE_PROCESS, *models(cfg, plan, ONE_PROCESS), tokenizer, out)
    grads = {}
    for run, key in ((sharded_run, "sharded"), (single_run, "single")):
        step = run.optimizer.step

        def step_and_keep(*args, _step=step, _run=run, _key=key, **kwargs):
            if _key not in grads:  # the gradients of step 1, before AdamW uses them
                grads[_key] = full_grads(_run.student)
            return _step(*args, **kwargs)

        run.optimizer.step = step_and_keep
    sampler = single_run.sampler.rollout  # synced by every update: its batches carry the right weight version
    report = {"loss": [], "grad_norm": [], "lr": []}
    upper_blocks_ran = []
    for block in decoder_layers(sharded_run.student)[2:]:
        block.register_forward_pre_hook(lambda module, args: upper_blocks_ran.append(1))
    for step in range(1, 4):
        torch.manual_seed(100 + step)  # the same global batch on every process
        batch = sampler.generate(prompts, SamplingParams(n=2, max_new_tokens=10))
        half = batch.response_ids.shape[0] // world.size
        mine = batch.select(slice(world.rank * half, (world.rank + 1) * half))
        sharded = update(sharded_run, mine, step, {})
        single = update(single_run, batch, step, {})
        for key in report:
            report[key].append([sharded[key], single[key]])
    report["grad_difference_step_1"] = max_difference(grads["sharded"], grads["single"])
    report["upper_blocks_ran"] = len(upper_blocks_ran)
    weights = distributed.full_model_state(sharded_run.student)
    if world.main:
        reference = {k: v for k, v in single_run.student.state_dict().items() if k in weights}
        report["weight_difference_step_3"] = max_difference(weights, reference)
    return report


def check_generation(world, tokenizer, prompts):
    """Sampling from the sharded student, each process with its own response length: the same
    tokens as one process sampling alone, and no process waits forever for the other."""
    cfg = load_config(SMOKE / "oprd.yaml")
    plan = LossPlan.from_config(cfg.opd, cfg.oprd, 4, 4, len(tokenizer))
    sharded, _ = models(cfg, plan, world)
    single, _ = models(cfg, plan, ONE_PROCESS)
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
    plan = LossPlan.from_config(cfg.opd, cfg.oprd, 4, 4, len(tokenizer))
    sharded, _ = models(cfg, plan, world)
    single, _ = models(cfg, plan, ONE_PROCESS)
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
