"""The batch that sampling produces and every loss reads.

The sequence fed to a model is `[prompt_ids | response_ids]` (B, P + T). Prompts are left-padded
and responses right-padded, so response token t sits at column P + t in every row and is predicted
by the model output at column P + t - 1.

A batch is built whole and never changed afterwards (the dataclasses are frozen): across
tokenizers, `alignment.retokenize` builds the teacher's view of a sampled batch and returns a new
batch that carries it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class RolloutBatch:
    """Prompts and sampled responses, laid out for scoring by the student and the teacher."""

    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) long
    response_ids: torch.Tensor  # (B, T) long, right-padded
    response_mask: torch.Tensor  # (B, T) long; 1 on valid tokens, contiguous from 0, EOS included
    prompt_index: torch.Tensor  # (B,) long: which input prompt each row answers
    truncated: torch.Tensor  # (B,) bool: stopped by max_new_tokens, not by EOS
    teacher_view: TeacherView | None = None  # across tokenizers: the teacher's own tokens of these rows
    weight_version: int = 0  # the student's optimizer steps when it sampled these rows (the on-policy check)
    sampled_logprobs: torch.Tensor | None = None  # (B, T) the sampler's own log-probs (vLLM), for diagnostics
    packed: bool = False  # fed to a model as one row without padding (`capture.model_inputs`); see `packed_rows`

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

    def select(self, rows: slice | torch.Tensor) -> RolloutBatch:
        """Rows of the batch (a micro-batch), as narrow as its own rows: the prompt block without
        the left-padding columns every selected row has (so one row carries no padding at all, and
        attention needs no explicit mask), the response block trimmed to its longest row."""
        width = max(int(self.response_lengths[rows].max()), 1)
        prompt_mask = self.prompt_mask[rows]
        lead = prompt_mask.shape[1] - max(int(prompt_mask.sum(1).max()), 1)  # prompts are right-aligned
        return RolloutBatch(
            prompt_ids=self.prompt_ids[rows, lead:],
            prompt_mask=prompt_mask[:, lead:],
            response_ids=self.response_ids[rows, :width],
            response_mask=self.response_mask[rows, :width],
            prompt_index=self.prompt_index[rows],
            truncated=self.truncated[rows],
            teacher_view=self.teacher_view.select(rows, width) if self.teacher_view is not None else None,
            weight_version=self.weight_version,
            sampled_logprobs=self.sampled_logprobs[rows, :width] if self.sampled_logprobs is not None else None,
            packed=self.packed,
        )

    def packed_rows(self) -> RolloutBatch:
        """The same rows, fed to a model packed (`optim.pack_sequences`): each row's tokens without
        padding, the rows one after another in a single row, positions counted from 0 in each, so
        attention stays within each sequence. Every tensor here keeps its padded (B, T) layout;
        only the model's inputs and the positions read from its outputs change (`capture`), and
        they come out in the same row-major order. The teacher's own tokens are packed alike."""
        view = self.teacher_view
        return dataclasses.replace(self, packed=True, teacher_view=None if view is None else
                                   TeacherView(dataclasses.replace(view.batch, packed=True), view.partner_B_T))

    def with_rows_only(self, rows_B: torch.Tensor) -> RolloutBatch:
        """The batch with the responses of rows outside `rows_B` ((B,) bool) masked out: every
        loss and normalizer over it counts only those rows (one teacher's share of a routed batch)."""
        return dataclasses.replace(self, response_mask=self.response_mask * rows_B[:, None].to(self.response_mask))

    def micro_batches(self, size: int, packed: bool = False) -> list[RolloutBatch]:
        """Consecutive groups of `size` rows (the last may be smaller), each trimmed by `select`."""
        rows = self.response_ids.shape[0]
        return self.grouped([list(range(first, min(first + size, rows))) for first in range(0, rows, size)], packed)

    def token_budget_groups(self, budget: int, packed: bool = False) -> list[list[int]]:
        """The rows in groups whose micro-batch (`select`) holds at most `budget` token slots: padded,
        rows x (its longest prompt + its longest response); packed, the sum of its rows' lengths.
        First-fit decreasing: rows in order of their own length, longest first, each into the first
        group it fits; a row longer than the budget alone makes a group of its own. Rows in each
        group in batch order."""
        prompts, responses = self.prompt_mask.sum(1).tolist(), self.response_lengths.clamp(min=1).tolist()
        groups: list[list[int]] = []
        widest: list[tuple[int, int]] = []  # per group: (longest prompt, longest response)
        for row in sorted(range(len(prompts)), key=lambda row: -(prompts[row] + responses[row])):
            for index, (prompt, response) in enumerate(widest):
                grown = (max(prompt, prompts[row]), max(response, responses[row]))
                tokens = (sum(prompts[r] + responses[r] for r in groups[index]) + prompts[row] + responses[row]
                          if packed else (len(groups[index]) + 1) * sum(grown))
                if tokens <= budget:
                    groups[index].append(row)
                    widest[index] = grown
                    break
            else:
                groups.append([row])
                widest.append((prompts[row], responses[row]))
        return [sorted(group) for group in groups]

    def grouped(self, groups: list[list[int]], packed: bool = False) -> list[RolloutBatch]:
        """One micro-batch (`select`) per group of rows, fed packed (`packed_rows`) where asked."""
        parts = [self.select(torch.tensor(rows)) for rows in groups]
        return [part.packed_rows() for part in parts] if packed else parts

    def tensors(self) -> dict[str, torch.Tensor]:
        """The batch as named tensors (safetensors can hold them); the teacher's view is not kept:
        it is built again from the student's tokens (`rollout.Sampler`)."""
        named = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return {**named, "weight_version": torch.tensor(self.weight_version)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RolloutBatch:
        """The inverse of `tensors`."""
        tensors = dict(tensors)
        return cls(**tensors | {"weight_version": int(tensors["weight_version"])})

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return RolloutBatch(**{name: value.to(device) if hasattr(value, "to") else value
                               for name, value in moved.items()})


@dataclass(frozen=True)
class TeacherView:
    """The teacher's own tokens for a student batch, and which positions pair up.

    `batch` holds the teacher's rendering of the prompts (left-padded, P') and the student's
    response text re-tokenised by the teacher (right-padded, T'), EOS appended where the student
    stopped. `partner_B_T`: for each student response position, the teacher response position that
    has read the same text, or -1. Partners increase along each row, so student positions and their
    partners come out in the same row-major order.
    """

    batch: RolloutBatch
    partner_B_T: torch.Tensor  # (B, T) long

    def select(self, rows: slice | torch.Tensor, width: int) -> TeacherView:
        return TeacherView(self.batch.select(rows), self.partner_B_T[rows, :width])

    def to(self, device: torch.device | str) -> TeacherView:
        return TeacherView(self.batch.to(device), self.partner_B_T.to(device))

    def matched_share(self, response_mask: torch.Tensor) -> float:
        """Share of the student's response positions that have a partner."""
        return float((self.partner_B_T >= 0).sum()) / max(int(response_mask.sum()), 1)


def split_into(groups: list[list[int]], count: int) -> list[list[int]]:
    """`groups` split until there are `count` of them: the group of most rows (the first of those
    tied) halved each time, so no group's token count grows. Under several processes each runs as
    many micro-batches as the one that needs most, since a sharded model's forward is a collective."""
    groups = [list(group) for group in groups]
    while len(groups) < count:
        index = max(range(len(groups)), key=lambda i: len(groups[i]))
        group = groups[index]
        if len(group) < 2:
            raise ValueError(f"{sum(map(len, groups))} rows cannot make {count} micro-batches")
        groups[index : index + 1] = [group[: len(group) // 2], group[len(group) // 2 :]]
    return groups


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, width) ids and mask, right-aligned (prompts are left-padded)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def concat(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Batches of one sampling call, stacked: prompts re-padded on the left, responses on the right."""
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
        weight_version=parts[0].weight_version,
    )
