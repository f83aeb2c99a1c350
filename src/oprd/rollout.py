"""Sampling responses from a policy, behind a small interface.

Training and evaluation both go through `Rollout.generate`, so a faster backend (vLLM, an
inference server) can replace `HFRollout` without touching either loop. `Sampler` is what the
trainer and Stage 1 sample through: it builds each batch whole, the teacher's view included when
the teacher reads another tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from oprd import distributed
from oprd.alignment import retokenize, with_teacher_prompts
from oprd.batch import RolloutBatch, concat, pad_left
from oprd.config import RolloutConfig
from oprd.data import PromptSet
from oprd.distributed import World
from oprd.models import eos_token_ids


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    n: int = 1  # responses per prompt


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Sampling seeded with `seed`, leaving the caller's RNG streams (which a trainer checkpoints
    for exact resume) as they were. Only `device`'s generator is forked on a GPU (by default the
    current one): forking every visible device would initialise them all."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class Rollout(Protocol):
    """What the trainer and the evaluator need from a sampler."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Samples `params.n` responses for each tokenised prompt; rows are grouped by prompt."""
        ...

    weight_version: int  # the version of the student's weights it samples from (its optimizer steps)

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Called before the first rollout and after each optimizer step (`version` = the steps
        taken): backends holding their own copy of the weights load the new ones here."""
        ...


class _BlockTokensAbove(LogitsProcessor):
    """Never samples embedding rows beyond the tokenizer (padding rows of the embedding matrix)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab_size :] = -float("inf")
        return scores


class HFRollout:
    """Batched sampling with `transformers.generate` (KV cache, left padding).

    Sampling is pure: no top-k cut (HF's default top_k=50 would bias the on-policy estimate), no
    repetition penalty, whatever the model's own generation_config says. It runs in the training
    forward's precision (`compute_dtype`: bf16 autocast over float32 master weights, so the KV cache
    is bf16 too), not in the master weights' float32. Randomness comes from torch's global
    generator, which the caller seeds and checkpoints.

    Each generate call holds at most `max_batch_sequences` sequences and at most what fits a KV
    cache of `kv_cache_bytes` (HF keeps every row's cache until the longest row ends, so a call of
    n sequences holds n x (longest prompt + max_new_tokens) positions): `sequences_per_call`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        eos_token_ids: list[int],
        vocab_size: int,
        max_batch_sequences: int = 64,
        synced: bool = False,
        compute_dtype: torch.dtype | None = None,
        kv_cache_bytes: int | None = None,
    ):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.vocab_size = vocab_size
        self.max_batch_sequences = max_batch_sequences
        self.synced = synced  # several processes sample together: each runs as many forwards as the longest
        self.compute_dtype = compute_dtype  # None: the weights' own
        if kv_cache_bytes is None:
            kv_cache_bytes = kv_cache_budget(next(model.parameters()).device)
        self.kv_cache_bytes = kv_cache_bytes  # one generate call's KV cache at most
        self.weight_version = 0

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_batch_sequences: int = 64,
        compute_dtype: torch.dtype | None = None, kv_cache_bytes: int | None = None,
    ) -> HFRollout:
        """Samples `model` with its tokenizer's padding, every EOS id it uses, and its vocabulary; in
        step with the other processes when the model is sharded across them. `kv_cache_bytes`
        None: `kv_cache_budget` of the model's device."""
        return cls(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos_token_ids(model, tokenizer),
                   vocab_size=len(tokenizer), max_batch_sequences=max_batch_sequences,
                   synced=distributed.is_sharded(model), compute_dtype=compute_dtype, kv_cache_bytes=kv_cache_bytes)

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        self.model = model  # generates from the live training weights
        self.weight_version = version

    def _precision(self, device: torch.device):
        weights = next(self.model.parameters()).dtype
        if self.compute_dtype is None or self.compute_dtype == weights:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        longest = max(len(prompt) for prompt in prompts)
        if self.synced:  # every process must make as many calls as the others
            longest = int(distributed.current().max(torch.tensor(longest)))
        cache_dtype = self.compute_dtype or next(self.model.parameters()).dtype
        sequences = sequences_per_call(kv_cache_bytes_per_token(self.model.config, cache_dtype),
                                       longest + params.max_new_tokens, self.kv_cache_bytes, self.max_batch_sequences)
        prompts_per_call = max(1, sequences // params.n)
        parts = [
            self._generate_chunk(prompts[i : i + prompts_per_call], params, first_index=i)
            for i in range(0, len(prompts), prompts_per_call)
        ]
        return concat(parts, self.pad_token_id)

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams, first_index: int) -> RolloutBatch:
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = pad_left(prompts, self.pad_token_id)
        sample = params.temperature > 0
        config = GenerationConfig(
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=0 if sample else None,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        processors = LogitsProcessorList()
        if self.model.get_output_embeddings().weight.shape[0] > self.vocab_size:
            processors.append(_BlockTokensAbove(self.vocab_size))
        was_training = self.model.training
        self.model.eval()
        try:
            with distributed.gathered(self.model), _settings_of_our_own(self.model), self._precision(device):
                out = self.model.generate(
                    input_ids=prompt_ids.to(device),
                    attention_mask=prompt_mask.to(device),
                    generation_config=config,
                    logits_processor=processors,
                    synced_gpus=self.synced,
                ).cpu()
        finally:
            self.model.train(was_training)
        response_ids = out[:, prompt_ids.shape[1] :]
        response_mask, truncated = _mask_after_eos(response_ids, self.eos_token_ids)
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_token_id)
        index = torch.arange(first_index, first_index + len(prompts)).repeat_interleave(params.n)
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(params.n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(params.n, dim=0),
            response_ids=response_ids,
            response_mask=response_mask,
            prompt_index=index,
            truncated=truncated,
            weight_version=self.weight_version,
        )


KV_CACHE_SHARE = 0.25  # of the device's memory, for one generate call's KV cache when no budget is given


def kv_cache_budget(device: torch.device, gib: float = 0.0) -> int:
    """Bytes one generate call's KV cache may hold: `gib` where given, else KV_CACHE_SHARE of the
    device's total memory. Total, not free: the budget decides how prompts are split into calls,
    which decides how the random stream is drawn, so it must not move with what happens to be
    allocated (a resumed run, which holds AdamW's state before its first step, samples as the
    uninterrupted one did)."""
    if gib > 0:
        return int(gib * 2**30)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        total = psutil.virtual_memory().total
    return int(KV_CACHE_SHARE * total)


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes HF's KV cache holds for one position: a key and a value for each KV head of each layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


def sequences_per_call(bytes_per_token: int, positions: int, budget_bytes: int, most: int) -> int:
    """Sequences one generate call may hold: as many of `positions` (prompt + new tokens) as the
    budget has room for, at most `most`, at least 1."""
    return max(1, min(most, budget_bytes // (bytes_per_token * positions)))


@contextmanager
def _settings_of_our_own(model: torch.nn.Module) -> Iterator[None]:
    """transformers fills every field a call's GenerationConfig leaves unset from the checkpoint's
    generation_config.json (repetition_penalty, min_p, no_repeat_ngram_size, typical_p, ...), so a
    student whose folder sets a repetition penalty would sample from a penalised distribution: off
    policy, and unlike the vLLM backend. For the call the model's own is an empty one, so only the
    settings `_generate_chunk` names apply."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _mask_after_eos(response_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) mask that keeps tokens up to and including the first EOS; (B,) rows with no EOS."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, dtype=response_ids.dtype))
    eos_seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~eos_seen_before).long(), ~is_eos.any(-1)


def make_rollout(cfg: RolloutConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, world: World,
                 workdir: Path, source: str, longest_sequence: int, compute_dtype: torch.dtype) -> Rollout:
    """The sampler `rollout.backend` names, for the student `model` (loaded from `source`): the one
    place a run's rollout is built. Both sample in the training forward's `compute_dtype`. A vLLM
    backend holds its own copy of the weights: the caller syncs them before the first rollout. A
    colocated engine sizes its KV cache for
    `longest_sequence` tokens (prompt and response), not the model's whole context (40,960
    positions of Qwen3 would need 9 GiB of float32 cache for one sequence of a 0.6B model)."""
    if cfg.backend == "hf":
        return HFRollout.for_model(model, tokenizer, cfg.max_batch_sequences, compute_dtype=compute_dtype,
                                   kv_cache_bytes=kv_cache_budget(next(model.parameters()).device, cfg.kv_cache_gib))
    from oprd import vllm_backend

    device = next(model.parameters()).device
    if cfg.vllm_mode == "server":
        sync = cfg.vllm_sync if cfg.vllm_sync != "auto" else ("nccl" if device.type == "cuda" else "disk")
        return vllm_backend.ServerRollout(cfg.vllm_url, vllm_backend.Sampling.of(model, tokenizer),
                                          weights_dir=workdir / ".vllm-weights", sync=sync, world=world,
                                          timeout_s=cfg.vllm_timeout_s, sync_dtype=compute_dtype)
    dtype = str(compute_dtype).removeprefix("torch.")
    return vllm_backend.ColocatedRollout(model, tokenizer, source=source, dtype=dtype, world=world,
                                         gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                         max_model_len=min(longest_sequence,
                                                           getattr(model.config, "max_position_embeddings", 4096)))


def done(batch: RolloutBatch) -> Future:
    """A future that already holds `batch`."""
    future: Future = Future()
    future.set_result(batch)
    return future


class PendingBatch:
    """A batch a `Sampler` has asked for: sampled in the background by a rollout that can
    (`ServerRollout.submit`), otherwise already sampled. `result` waits for it and finishes it."""

    def __init__(self, sampler: Sampler, indices: list[int], future: Future):
        self.sampler, self.indices, self.future = sampler, indices, future
        self.submitted = time.perf_counter()
        self.sampled = self.submitted  # when the rollout finished it (the same moment when it sampled at once)
        self.waited = 0.0  # seconds the trainer spent blocked on it (`wait`)
        future.add_done_callback(lambda _: setattr(self, "sampled", time.perf_counter()))

    def wait(self) -> float:
        """Blocks until the rollout has sampled the batch; returns the seconds spent blocked."""
        started = time.perf_counter()
        self.future.result()
        waited = time.perf_counter() - started
        self.waited += waited
        return waited

    def raw(self) -> RolloutBatch:
        """The batch as the rollout returned it (what a checkpoint keeps of a batch sampled ahead)."""
        return self.future.result()

    def result(self) -> RolloutBatch:
        self.wait()
        return self.sampler.finish(self.indices, self.raw())

    @property
    def hidden_seconds(self) -> float:
        """The sampling time nobody waited for: spent while the trainer did other work."""
        return max(self.sampled - self.submitted - self.waited, 0.0)


@dataclass
class Sampler:
    """Draws the batch of chosen prompts through a `Rollout`, on `device`; across tokenizers (the
    prompt set holds the teacher's own renderings) the batch carries the teacher's view of it."""

    rollout: Rollout
    prompts: PromptSet
    student_tokenizer: PreTrainedTokenizerBase
    teacher_tokenizer: PreTrainedTokenizerBase
    device: torch.device

    def sample(self, indices: list[int], params: SamplingParams) -> RolloutBatch:
        """The responses to prompts `indices` of the prompt set; each row's `prompt_index` is its
        prompt's index in the set."""
        return self.submit(indices, params).result()

    def submit(self, indices: list[int], params: SamplingParams) -> PendingBatch:
        """`sample`, returning at once where the rollout samples in the background (a vLLM server):
        its random draws are made now, so the batch is the same whenever it is collected."""
        prompts = [self.prompts.student[i] for i in indices]
        submit = getattr(self.rollout, "submit", None)
        return PendingBatch(self, indices, submit(prompts, params) if submit else done(self.rollout.generate(prompts,
                                                                                                               params)))

    def finish(self, indices: list[int], sampled: RolloutBatch) -> RolloutBatch:
        """A rollout's batch of prompts `indices`, on the device, with the teacher's view of it."""
        batch = sampled.to(self.device)
        if self.prompts.teacher is not None:
            teacher_prompts = [self.prompts.teacher[i] for i in indices]
            if self.prompts.retokenize:
                batch = retokenize(batch, self.student_tokenizer, self.teacher_tokenizer, teacher_prompts)
            else:
                batch = with_teacher_prompts(batch, teacher_prompts, self.student_tokenizer.pad_token_id)
        in_set = torch.tensor(indices, dtype=torch.long)[batch.prompt_index.cpu()].to(batch.prompt_index.device)
        return replace(batch, prompt_index=in_set)
