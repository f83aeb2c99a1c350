"""Cross-tokenizer position matching: each model reads the same text with its own tokenizer.

The student samples token ids. Their text is decoded once, re-tokenised by the teacher (after the
teacher's own rendering of the prompt), and positions are paired where both models have read
exactly the same text: a student token and a teacher token whose end offsets coincide
(`align_by_offsets`). The paper leaves this matching unspecified.

Position convention (as in the trainer): response position t is the model output that predicts
response token t, i.e. the state after reading the prompt and response[:t]. So position 0 of both
models pairs (both have read exactly the prompt), and a matched token pair (i, j) pairs positions
(i + 1, j + 1) where both exist.

  align_by_offsets         (student_index, teacher_index) pairs of one text whose token ends coincide
  decoded_offsets          text and per-token spans of ids a model sampled (not necessarily canonical)
  retokenize               a sampled batch, rebuilt with the teacher's view of it (`batch.TeacherView`)
  with_teacher_prompts     the same, for a teacher with the student's tokenizer that reads another
                           prompt (a privileged context): response positions pair one to one
  positions_with_partner   the student response positions a representation loss may use
  teacher_inputs           teacher inputs and positions paired, in order, with kept student positions
  paired_states            both models' hidden states at paired positions (no grad)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from oprd.batch import RolloutBatch, TeacherView, pad_left
from oprd.capture import capture_hidden, model_inputs, response_positions


def _clean_ends(offsets: Sequence[Sequence[int]], side: str) -> list[tuple[int, int]]:
    """(end, token index) of the tokens after which a whole prefix of the text has been read."""
    spans = [(int(start), int(end)) for start, end in offsets]
    next_start = [math.inf] * len(spans)  # start of the next non-empty token after each token
    upcoming = math.inf
    for i in range(len(spans) - 1, -1, -1):
        next_start[i] = upcoming
        if spans[i][0] < spans[i][1]:
            upcoming = spans[i][0]
    ends: list[tuple[int, int]] = []
    last_end = -1
    for i, (start, end) in enumerate(spans):
        if start > end:
            raise ValueError(f"{side} token {i} has a reversed span ({start}, {end})")
        if start == end:
            continue  # special token added outside the text, or a zero-width piece
        if end < last_end:
            raise ValueError(f"{side} offsets are not in text order: token {i} ends at {end} after {last_end}")
        last_end = end
        # A byte-level piece can end in the middle of a character: HF then reports the whole
        # character in its span and the next token starts before this one's end ('hÃ' (0, 2),
        # '©llo' (1, 5) for "héllo"). Such a position has not read text[:end], so it is skipped;
        # this also keeps only the last of several pieces ending at the same character.
        if next_start[i] < end:
            continue
        ends.append((end, i))  # strictly increasing: of equal ends, only the last passes the test above
    return ends


def align_by_offsets(
    student_offsets: Sequence[Sequence[int]], teacher_offsets: Sequence[Sequence[int]]
) -> list[tuple[int, int]]:
    """(student_index, teacher_index) pairs at which both tokenizers have read the same text.

    Offsets are per-token (start, end) character spans of one text under each tokenizer, as
    `tokenizer(text, return_offsets_mapping=True)` gives them. A pair is formed where the end
    offsets coincide, so both models have read exactly `text[:end]`; pairs come in text order.
    Tokens with empty spans (special tokens added outside the text, (0, 0)) never match, nor do
    byte pieces that stop inside a character (the next token starts before their end); of several
    pieces ending at the same character, the last one is used. One walk over both lists: O(S + T).
    """
    student, teacher = _clean_ends(student_offsets, "student"), _clean_ends(teacher_offsets, "teacher")
    pairs, i, j = [], 0, 0
    while i < len(student) and j < len(teacher):
        (s_end, s_index), (t_end, t_index) = student[i], teacher[j]
        if s_end == t_end:
            pairs.append((s_index, t_index))
            i, j = i + 1, j + 1
        elif s_end < t_end:
            i += 1
        else:
            j += 1
    return pairs


def matched_share(pairs: Sequence[tuple[int, int]], student_offsets: Sequence[Sequence[int]]) -> float:
    """Share of the student's text tokens (non-empty spans) that `align_by_offsets` matched."""
    text_tokens = sum(1 for start, end in student_offsets if int(end) > int(start))
    return len(pairs) / text_tokens if text_tokens else 0.0


def decoded_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of `ids` and each token's (start, end) character span in it.

    Sampled ids need not be the tokenizer's own encoding of their text, so a token's end is where
    `decode(ids[:i + 1])` ends, when that is a prefix of the whole text. A token whose prefix is
    not (a byte piece stopping inside a character decodes to U+FFFD) gets an empty span, which
    `align_by_offsets` never matches. Cost O(T): re-encoding's offsets serve the leading tokens it
    reproduces; after that, each token is decoded in a short window that starts one token before
    the last token that ended on a prefix (that context token absorbs decoders that strip a
    leading space), and the piece it adds is accepted only where the text continues with it.
    """
    ids = [int(i) for i in ids]
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=False,  # noqa: E731
                                           clean_up_tokenization_spaces=False)
    text = decode(ids)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    canonical = 0  # leading tokens that re-encoding reproduces
    while canonical < min(len(ids), len(encoded.input_ids)) and ids[canonical] == encoded.input_ids[canonical]:
        canonical += 1
    if canonical == len(ids) == len(encoded.input_ids):
        return text, [(int(a), int(b)) for a, b in encoded.offset_mapping]
    # Re-encoding's spans are only trusted strictly before the first differing token: the token
    # just before it may be a byte piece whose span re-encoding reports differently.
    anchor = max(canonical - 1, 0)  # decode(ids[:anchor]) == text[:end]
    spans = [(int(a), int(b)) for a, b in encoded.offset_mapping[:anchor]]
    end = spans[-1][1] if spans else 0
    for i in range(anchor, len(ids)):
        if anchor == 0:
            piece = decode(ids[: i + 1])
        else:
            context, window = decode(ids[anchor - 1 : anchor]), decode(ids[anchor - 1 : i + 1])
            piece = window[len(context):] if window.startswith(context) else None
        if piece is not None and text.startswith(piece, end):
            spans.append((end, end + len(piece)))
            end, anchor = end + len(piece), i + 1
        else:
            spans.append((end, end))  # has not read a whole prefix of the text
    return text, spans


def retokenize(batch: RolloutBatch, student_tokenizer, teacher_tokenizer,
               teacher_prompts: Sequence[Sequence[int]]) -> RolloutBatch:
    """`batch` with the teacher's view of it: teacher_prompts[i] is the teacher's rendering of
    prompt i of the generate() call (`batch.prompt_index`); responses are re-read from their text."""
    if teacher_tokenizer.eos_token_id is None:
        raise ValueError("the teacher tokenizer has no eos_token: cannot mark where a response ended")
    prompts, responses, partners = [], [], []
    for row, response in enumerate(batch.responses()):
        ended = not bool(batch.truncated[row]) and len(response) > 0
        text_ids = response[:-1] if ended else response
        text, student_spans = decoded_offsets(student_tokenizer, text_ids)
        encoded = teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        teacher_ids = list(encoded.input_ids) + ([teacher_tokenizer.eos_token_id] if ended else [])
        teacher_ids = teacher_ids or [teacher_tokenizer.eos_token_id]  # an empty text still gets one row
        partner = [-1] * len(response)
        if response:
            partner[0] = 0  # both have read exactly their prompt
        for i, j in align_by_offsets(student_spans, encoded.offset_mapping):
            if i + 1 < len(response) and j + 1 < len(teacher_ids):
                partner[i + 1] = j + 1
        prompts.append(list(teacher_prompts[int(batch.prompt_index[row])]))
        responses.append(teacher_ids)
        partners.append(partner)
    pad = teacher_tokenizer.pad_token_id
    pad = pad if pad is not None else teacher_tokenizer.eos_token_id
    prompt_ids, prompt_mask = pad_left(prompts, pad)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), pad, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    partner = torch.full(tuple(batch.response_ids.shape), -1, dtype=torch.long)
    for row, (ids, pairs) in enumerate(zip(responses, partners)):
        response_ids[row, : len(ids)] = torch.tensor(ids)
        response_mask[row, : len(ids)] = 1
        partner[row, : len(pairs)] = torch.tensor(pairs, dtype=torch.long)
    teacher_batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask,
                                 batch.prompt_index.clone(), batch.truncated.clone())
    return replace(batch, teacher_view=TeacherView(teacher_batch, partner).to(batch.response_ids.device))


def with_teacher_prompts(batch: RolloutBatch, teacher_prompts: Sequence[Sequence[int]], pad_id: int) -> RolloutBatch:
    """`batch` with the view of a teacher that shares the student's tokenizer but reads its own
    prompt: teacher_prompts[i] for prompt i of the generate() call (`batch.prompt_index`). The
    response tokens are the same, so response position t pairs with the teacher's position t,
    whatever the two prompts' lengths."""
    prompts = [list(teacher_prompts[int(i)]) for i in batch.prompt_index]
    prompt_ids, prompt_mask = pad_left(prompts, pad_id)
    device = batch.response_ids.device
    teacher_batch = replace(batch, prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
                            teacher_view=None, sampled_logprobs=None)
    positions_B_T = torch.arange(batch.response_ids.shape[1], device=device).expand_as(batch.response_ids)
    partner_B_T = positions_B_T.masked_fill(batch.response_mask == 0, -1)
    return replace(batch, teacher_view=TeacherView(teacher_batch, partner_B_T))


def positions_with_partner(batch: RolloutBatch) -> torch.Tensor:
    """(B, T) long: the response positions a representation loss may use: all valid ones, or,
    across tokenizers, those with a teacher partner."""
    if batch.teacher_view is None:
        return batch.response_mask
    return batch.response_mask * (batch.teacher_view.partner_B_T >= 0)


def teacher_inputs(batch: RolloutBatch, keep_B_T: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Teacher inputs and the (B, S') bool of teacher positions paired with the kept student
    response positions `keep_B_T`.

    The k-th kept student position (row-major) pairs with the k-th teacher position. Across
    tokenizers `keep_B_T` must only hold positions with a partner (`positions_with_partner`).
    """
    if batch.teacher_view is None:
        return model_inputs(batch), response_positions(batch, keep_B_T)
    view = batch.teacher_view
    if bool((keep_B_T & (view.partner_B_T < 0)).any()):
        raise ValueError("student positions without a teacher partner were selected; mask them with "
                         "positions_with_partner")
    teacher_keep_B_T = torch.zeros_like(view.batch.response_mask, dtype=torch.bool)
    b, t = keep_B_T.nonzero(as_tuple=True)
    teacher_keep_B_T[b, view.partner_B_T[b, t]] = True
    return model_inputs(view.batch), response_positions(view.batch, teacher_keep_B_T)


@torch.no_grad()
def paired_states(
    student: torch.nn.Module, teacher: torch.nn.Module, batch: RolloutBatch, keep_B_T: torch.Tensor,
    student_layers: Sequence[int], teacher_layers: Sequence[int],
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Hidden states of both models at paired positions: ({s: (N, D_S)}, {t: (N, D_T)}), no grad.

    `keep_B_T` selects student response positions (across tokenizers, only those with a partner);
    row n of every student tensor pairs with row n of every teacher tensor. Each model reads its
    inputs on its own device.
    """
    teacher_in, teacher_keep_B_S = teacher_inputs(batch, keep_B_T)
    student_keep_B_S = response_positions(batch, keep_B_T)
    states = []
    for model, inputs, keep_B_S, layers in ((student, model_inputs(batch), student_keep_B_S, student_layers),
                                            (teacher, teacher_in, teacher_keep_B_S, teacher_layers)):
        device = next(model.parameters()).device
        states.append(capture_hidden(model, {k: v.to(device) for k, v in inputs.items()}, sorted(set(layers)),
                                     keep_B_S.to(device)))
    return states[0], states[1]
