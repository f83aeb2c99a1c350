"""Sampling responses from a policy, behind a small interface.

Training and evaluation both go through `Rollout.generate`, so a faster backend (vLLM, an
inference server) can replace `HFRollout` without touching either loop.

Shape letters used here and in the trainer:
  B  sequences in the batch (prompts x responses per prompt)
  P  width of the left-padded prompt block
  T  width of the right-padded response block
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

if TYPE_CHECKING:
    from oprd.alignment import TeacherView


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    n: int = 1  # responses per prompt


@dataclass
class RolloutBatch:
    """Prompts and sampled responses, laid out for scoring by the student and the teacher.

    The sequence fed to a model is `[prompt_ids | response_ids]` (B, P + T). Prompts are
    left-padded and responses right-padded, so response token t sits at column P + t in every
    row and is predicted by the model output at column P + t - 1.
    """

    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) long
    response_ids: torch.Tensor  # (B, T) long, right-padded
    response_mask: torch.Tensor  # (B, T) long; 1 on valid tokens, contiguous from 0, EOS included
    prompt_index: torch.Tensor  # (B,) long: which input prompt each row answers
    truncated: torch.Tensor  # (B,) bool: stopped by max_new_tokens, not by EOS
    # Across tokenizers: the teacher's own tokens of these rows (oprd.alignment.retokenize)
    teacher_view: "TeacherView | None" = None

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:  # (B, P + T), as `generate` numbers left-padded rows
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def response_lengths(self) -> torch.Tensor:  # (B,)
        return self.response_mask.sum(-1)

    def responses(self) -> list[list[int]]:
        """Valid response tokens of each row, EOS included when sampled."""
        return [row[: int(n)].tolist() for row, n in zip(self.response_ids, self.response_lengths)]

    def select(self, rows: slice | torch.Tensor) -> "RolloutBatch":
        """Rows of the batch (a micro-batch), with the response block trimmed to its longest row."""
        width = max(int(self.response_lengths[rows].max()), 1)
        return RolloutBatch(
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            response_ids=self.response_ids[rows, :width],
            response_mask=self.response_mask[rows, :width],
            prompt_index=self.prompt_index[rows],
            truncated=self.truncated[rows],
            teacher_view=self.teacher_view.select(rows, width) if self.teacher_view is not None else None,
        )

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return RolloutBatch(**{k: v if v is None else v.to(device) for k, v in self.__dict__.items()})


class Rollout(Protocol):
    """What the trainer and the evaluator need from a sampler."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Samples `params.n` responses for each tokenised prompt; rows are grouped by prompt."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Called after each optimizer step; backends holding their own copy reload it here."""
        ...


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


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
    repetition penalty, whatever the model's own generation_config says. Randomness comes from
    torch's global generator, which the caller seeds and checkpoints.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        eos_token_ids: list[int],
        vocab_size: int,
        max_batch_sequences: int = 64,
    ):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.vocab_size = vocab_size
        self.max_batch_sequences = max_batch_sequences

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # generates from the live training weights

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        prompts_per_call = max(1, self.max_batch_sequences // params.n)
        parts = [
            self._generate_chunk(prompts[i : i + prompts_per_call], params, first_index=i)
            for i in range(0, len(prompts), prompts_per_call)
        ]
        return _concat(parts, self.pad_token_id)

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
            out = self.model.generate(
                input_ids=prompt_ids.to(device),
                attention_mask=prompt_mask.to(device),
                generation_config=config,
                logits_processor=processors,
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
        )


def _mask_after_eos(response_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) mask that keeps tokens up to and including the first EOS; (B,) rows with no EOS."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, dtype=response_ids.dtype))
    eos_seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~eos_seen_before).long(), ~is_eos.any(-1)


def _concat(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.prompt_ids.shape[1] for p in parts)
    response_width = max(p.response_ids.shape[1] for p in parts)

    def widen(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)
        return torch.cat([pad, t] if left else [t, pad], dim=1)

    return RolloutBatch(
        prompt_ids=torch.cat([widen(p.prompt_ids, prompt_width, pad_id, True) for p in parts]),
        prompt_mask=torch.cat([widen(p.prompt_mask, prompt_width, 0, True) for p in parts]),
        response_ids=torch.cat([widen(p.response_ids, response_width, pad_id, False) for p in parts]),
        response_mask=torch.cat([widen(p.response_mask, response_width, 0, False) for p in parts]),
        prompt_index=torch.cat([p.prompt_index for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
    )
