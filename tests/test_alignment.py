"""oprd.alignment: spans of sampled (non-canonical) ids against a naive prefix decode, and a
batch re-read by a character-level teacher, where every paired row must have read the same text."""

from __future__ import annotations

import pytest
import torch

from oprd.alignment import decoded_offsets, positions_with_partner, retokenize, teacher_inputs
from oprd.batch import RolloutBatch, pad_left
from oprd.data import prompt_token_ids
from oprd.testing import train_char_tokenizer, train_tokenizer

CORPUS = ["Compute 3*7+2 mod 10.\n3*7=1\n1+2=3\nSo \\boxed{3}", "the quick brown fox héllo café 日本語"] * 20


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_tokenizer(CORPUS, 320, tmp_path_factory.mktemp("bpe"), split_digits=True)


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    return train_char_tokenizer(CORPUS, tmp_path_factory.mktemp("chars"))


def _naive_spans(tokenizer, ids):
    """Each token's end = length of the decoded prefix when it is a prefix of the whole text."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    spans, end = [], 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.startswith(prefix) and len(prefix) >= end:
            spans.append((end, len(prefix)))
            end = len(prefix)
        else:
            spans.append((end, end))
    return text, spans


@pytest.mark.parametrize("text", CORPUS[:2])
def test_canonical_ids_use_the_tokenizer_offsets(bpe, text):
    ids = bpe(text, add_special_tokens=False).input_ids
    decoded, spans = decoded_offsets(bpe, ids)
    assert decoded == text
    assert [e for _, e in spans] == [e for _, e in _naive_spans(bpe, ids)[1]]


def test_non_canonical_ids_match_a_naive_prefix_decode(bpe):
    text = "3*7=1 héllo café"
    canonical = bpe(text, add_special_tokens=False).input_ids
    # one byte-level piece per byte: a sequence the model can sample but the tokenizer never produces
    pieces = bpe.convert_tokens_to_ids(list("".join(bpe.convert_ids_to_tokens(canonical))))
    assert pieces != canonical and bpe.decode(pieces) == text
    decoded, spans = decoded_offsets(bpe, pieces)
    assert decoded == text
    assert spans == _naive_spans(bpe, pieces)[1]
    assert any(start == end for start, end in spans)  # byte pieces inside é never end a prefix
    mixed = canonical[:3] + pieces[len("".join(bpe.convert_ids_to_tokens(canonical[:3]))):]
    assert decoded_offsets(bpe, mixed) == _naive_spans(bpe, mixed)


def test_metaspace_decoder_that_strips_the_leading_space(tmp_path):
    """SentencePiece-style tokenizers drop the space of a sequence's first piece when decoding; spans
    must still follow the whole text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                             trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"], show_progress=False))
    metaspace = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    text = "the quick brown fox"
    canonical = metaspace(text, add_special_tokens=False).input_ids
    pieces = metaspace.convert_tokens_to_ids(list("".join(metaspace.convert_ids_to_tokens(canonical))))
    assert pieces != canonical
    for ids in (pieces, canonical[:2] + pieces[len("".join(metaspace.convert_ids_to_tokens(canonical[:2]))):]):
        decoded, spans = decoded_offsets(metaspace, ids)
        assert decoded == metaspace.decode(ids)
        assert spans == _naive_spans(metaspace, ids)[1]
        # only a leading lone '▁' reads nothing (decoding strips it); every other piece ends on a character
        assert sum(b == a for a, b in spans) <= 1


def _batch(bpe, responses: list[str], ended: list[bool]) -> RolloutBatch:
    prompts = [prompt_token_ids(bpe, [{"role": "user", "content": f"Compute {i}+1 mod 10."}])
               for i in range(len(responses))]
    prompt_ids, prompt_mask = pad_left(prompts, bpe.pad_token_id)
    encoded = [bpe(r, add_special_tokens=False).input_ids + ([bpe.eos_token_id] if e else [])
               for r, e in zip(responses, ended)]
    width = max(len(e) for e in encoded)
    response_ids = torch.full((len(encoded), width), bpe.pad_token_id)
    response_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        response_ids[row, : len(ids)], response_mask[row, : len(ids)] = torch.tensor(ids), 1
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask,
                        torch.arange(len(responses)), torch.tensor([not e for e in ended]))


def test_paired_positions_have_read_the_same_text(bpe, chars):
    responses = ["1+1=2\n2*3=6\nSo \\boxed{6}", "héllo 日本語 café", "3*7=1"]
    sampled = _batch(bpe, responses, ended=[True, True, False])
    teacher_prompts = [prompt_token_ids(chars, [{"role": "user", "content": f"Compute {i}+1 mod 10."}])
                       for i in range(len(responses))]
    batch = retokenize(sampled, bpe, chars, teacher_prompts)
    assert sampled.teacher_view is None and torch.equal(batch.response_ids, sampled.response_ids)
    view = batch.teacher_view
    decode = lambda tok, ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    for row, response in enumerate(batch.responses()):
        teacher_response = view.batch.responses()[row]
        ended = row != 2
        assert (teacher_response[-1] == chars.eos_token_id) == ended
        assert decode(chars, teacher_response[:-1] if ended else teacher_response) == responses[row]
        assert view.batch.prompt_ids[row][view.batch.prompt_mask[row].bool()].tolist() == teacher_prompts[row]
        for t in range(len(response)):
            j = int(view.partner_B_T[row, t])
            if j >= 0:  # student row t has read response[:t], teacher row j response'[:j]: the same text
                assert decode(bpe, response[:t]) == decode(chars, teacher_response[:j])
        matched = (view.partner_B_T[row, : len(response)] >= 0).sum()
        if responses[row].isascii():  # split digits and ASCII: every student position has a partner
            assert matched == len(response)
        else:
            assert matched >= 1
    assert view.matched_share(batch.response_mask) == 1.0  # this BPE ends every token on a character

    keep_B_T = positions_with_partner(batch).bool()
    assert (keep_B_T <= batch.response_mask.bool()).all()
    inputs, teacher_keep_B_S = teacher_inputs(batch, keep_B_T)
    assert teacher_keep_B_S.sum() == keep_B_T.sum()
    assert inputs["input_ids"].shape[1] == view.batch.input_ids.shape[1] - 1
    with pytest.raises(ValueError, match="without a teacher partner"):
        teacher_inputs(batch, batch.response_mask.bool() | ~keep_B_T)
    micro = batch.select(slice(1, 3))
    assert micro.teacher_view.partner_B_T.shape == micro.response_ids.shape
    assert torch.equal(micro.teacher_view.partner_B_T, view.partner_B_T[1:3, : micro.response_ids.shape[1]])
