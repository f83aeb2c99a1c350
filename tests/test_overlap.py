"""rollout.max_weight_lag=1 without a vLLM server: the trainer's pipeline (the next batch asked for
before this step trains, collected before the weights move on), what a checkpoint keeps of it, and
the settings that are refused. tests/test_vllm.py runs it against a real server."""

import dataclasses
import threading

import pytest
import torch
from helpers import SMOKE, update_run

from oprd.batch import RolloutBatch
from oprd.capture import model_inputs
from oprd.config import ConfigError, load_config
from oprd.data import PromptSet, PromptStream, load_problems
from oprd.distributed import ONE_PROCESS
from oprd.models import load_tokenizer
from oprd.rollout import HFRollout, Sampler
from oprd.trainer import sample, update


class BackgroundRollout:
    """transformers' generate behind `submit`, as ServerRollout offers it: the batch is sampled in
    another thread (here: only once the trainer asks for it, so a test can see the order of events)
    by the weights the rollout has when it is asked."""

    def __init__(self, inner: HFRollout, events: list):
        self.inner, self.events = inner, events
        self.weight_version = inner.weight_version

    def sync_weights(self, model, version):
        self.events.append(("sync", version))
        self.inner.sync_weights(model, version)
        self.weight_version = version

    def generate(self, prompts, params):
        return self.submit(prompts, params).result()

    def submit(self, prompts, params):
        from concurrent.futures import Future

        future, version = Future(), self.weight_version
        self.events.append(("submit", version))
        batch = self.inner.generate(prompts, params)  # drawn now, in order, from the run's generator
        with torch.no_grad():  # the sampler's log-probs of its tokens, as vLLM returns them
            logits = self.inner.model(**model_inputs(batch)).logits[:, -batch.response_ids.shape[1]:]
            sampled = torch.log_softmax(logits.float(), -1).gather(-1, batch.response_ids[..., None])[..., 0]
        batch = dataclasses.replace(batch, weight_version=version, sampled_logprobs=sampled)
        threading.Timer(0.05, lambda: future.set_result(batch)).start()
        return future


def lagged_run(tmp_path, events: list):
    cfg = load_config(SMOKE / "oprd_plus_opd.yaml", ["max_steps=3"])
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_weight_lag=1))  # a server's setting
    tokenizer = load_tokenizer(cfg.student)
    run = update_run(cfg, ONE_PROCESS, tokenizer, tmp_path)
    prompts = PromptSet.render(load_problems(str(SMOKE / "prompts.parquet"), limit=4), tokenizer)
    rollout = BackgroundRollout(HFRollout.for_model(run.student, tokenizer), events)
    run.sampler = Sampler(rollout, prompts, tokenizer, tokenizer, torch.device("cpu"))
    run.stream = PromptStream(len(prompts.student), cfg.rollout.prompts_per_step, cfg.seed)
    run.sampling = dataclasses.replace(run.sampling, max_new_tokens=6)
    return run


def test_the_next_batch_is_asked_for_before_the_update_and_collected_before_the_weights_move(tmp_path):
    events: list = []
    run = lagged_run(tmp_path, events)
    lags, ratio_seen = [], []
    for step in (1, 2, 3):
        timings: dict[str, float] = {}
        batch = sample(run, step, timings)
        events.append(("update", step))
        metrics = update(run, batch, step, timings)
        lags.append(metrics["rollout/weight_version_lag"])
        ratio_seen.append("opd/is_ratio_mean" in metrics)
        assert timings["sample_wait"] >= 0 and timings["sample_hidden"] >= 0
    assert lags == [0, 1, 1] and ratio_seen == [False, True, True]
    # step 1 samples at once; each step asks for the next batch (weights one update old) before it
    # updates, and the server's weights change only after that batch is sampled; no batch past the last step
    assert events == [("submit", 0), ("submit", 0), ("update", 1), ("sync", 1), ("submit", 1), ("update", 2),
                      ("sync", 2), ("update", 3), ("sync", 3)]
    assert run.pending is None


def test_a_batch_older_than_the_setting_is_refused(tmp_path):
    run = lagged_run(tmp_path, [])
    batch = sample(run, 1, {})
    with pytest.raises(RuntimeError, match=r"sampled by weights 2 steps old \(rollout.max_weight_lag=1\)"):
        update(run, dataclasses.replace(batch, weight_version=-1), 2, {})


def test_a_batch_kept_by_a_checkpoint_comes_back_as_it_was():
    generator = torch.Generator().manual_seed(0)
    batch = RolloutBatch(prompt_ids=torch.randint(0, 9, (2, 3), generator=generator),
                         prompt_mask=torch.ones(2, 3, dtype=torch.long),
                         response_ids=torch.randint(0, 9, (2, 4), generator=generator),
                         response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), prompt_index=torch.tensor([0, 0]),
                         truncated=torch.tensor([False, True]), weight_version=7,
                         sampled_logprobs=-torch.rand(2, 4, generator=generator))
    back = RolloutBatch.from_tensors(batch.tensors())
    for field in dataclasses.fields(RolloutBatch):
        ours, theirs = getattr(batch, field.name), getattr(back, field.name)
        assert torch.equal(ours, theirs) if isinstance(ours, torch.Tensor) else ours == theirs, field.name


@pytest.mark.parametrize("overrides", [[], ["rollout.backend=vllm", "rollout.vllm_mode=colocate"]])
def test_a_lag_without_a_server_is_refused_with_the_reason(overrides):
    with pytest.raises(ConfigError, match="rollout.max_weight_lag=1 samples the next batch while this one trains, "
                                          "which needs a sampler with devices of its own"):
        load_config(SMOKE / "oprd.yaml", ["rollout.max_weight_lag=1", *overrides])
    with pytest.raises(ConfigError, match="rollout.max_weight_lag must be one of 0, 1"):
        load_config(SMOKE / "oprd.yaml", ["rollout.max_weight_lag=2"])
