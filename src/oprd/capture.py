"""Reading hidden states out of a model, as cheaply as the loss allows.

`capture_hidden` serves the frozen teacher (under no_grad) and the student (with grad) alike:
it runs only the blocks the loss needs and keeps only the positions the loss reads. Logits are
computed here for one position only; the output-space losses apply each LM head chunk by chunk
(`losses.chunked_head_loss`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from oprd.batch import RolloutBatch
from oprd.models import base_model, decoder_layers, full_depth

FINAL = "final"  # key of the post-norm last hidden state, the LM head's input


def model_inputs(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """The (B, S) inputs, S = P + T - 1, whose outputs predict response tokens 0..T-1.

    The last response column predicts nothing, so it is not fed; the outputs that predict the
    response are then exactly the last T columns. A packed batch (`RolloutBatch.packed_rows`) is
    fed as (1, L): its rows' real tokens one after another, with no attention mask and positions
    from 0 in each row, from which transformers keeps attention within each sequence (a model that
    does not is refused by `packing_problem`).
    """
    inputs = {
        "input_ids": batch.input_ids[:, :-1],
        "attention_mask": batch.attention_mask[:, :-1],
        "position_ids": batch.position_ids[:, :-1],
    }
    if not batch.packed:
        return inputs
    real_B_S = inputs.pop("attention_mask").bool()
    return {name: value[real_B_S][None] for name, value in inputs.items()}


def fed_tokens(batch: RolloutBatch) -> tuple[int, int]:
    """(real tokens, token slots) of what `model_inputs` feeds a model for `batch`: packed, both
    the same; padded, the slots also count the padding."""
    real = int(batch.attention_mask[:, :-1].sum())
    return real, real if batch.packed else batch.input_ids[:, :-1].numel()


def response_positions(batch: RolloutBatch, keep_B_T: torch.Tensor) -> torch.Tensor:
    """(B, S) bool selecting the model outputs that predict the kept response tokens (B, T) of
    `batch`; packed, (1, L) over its packed inputs, selecting the same outputs in the same order
    (every kept output is a real token's: the last prompt token's or a response token's)."""
    B, prompt_width = keep_B_T.shape[0], batch.prompt_ids.shape[1]
    lead = torch.zeros((B, prompt_width - 1), dtype=torch.bool, device=keep_B_T.device)
    keep_B_S = torch.cat([lead, keep_B_T.bool()], dim=1)
    if not batch.packed:
        return keep_B_S
    return keep_B_S[batch.attention_mask[:, :-1].bool()][None]


@torch.no_grad()
def packing_problem(model: torch.nn.Module) -> str | None:
    """None when `model` keeps two sequences packed in one row apart (each one's hidden states as
    when fed alone); otherwise how far they differ. Whether packing works is up to the model's
    attention code (transformers detects packed rows from position_ids for eager, sdpa, flex and
    flash attention), so it is measured, not assumed."""
    parameter = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=generator).to(parameter.device) for n in (3, 5))
    depth = len(decoder_layers(model))

    def states(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return capture_hidden(model, {"input_ids": ids, "position_ids": positions[None].to(ids.device)}, [depth])[depth]

    alone = torch.cat([states(first, torch.arange(3)), states(second, torch.arange(5))], dim=1).float()
    packed = states(torch.cat([first, second], dim=1), torch.cat([torch.arange(3), torch.arange(5)])).float()
    difference = float((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-12))
    tolerance = 1e-4 if parameter.dtype == torch.float32 else 2e-2
    return None if difference <= tolerance else f"its states differ by {difference:.2g} of their largest"


def capture_hidden(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    layers: list[int],
    keep_B_S: torch.Tensor | None = None,
    final: bool = False,
    layers_keep_B_S: torch.Tensor | None = None,
) -> dict[int | str, torch.Tensor]:
    """Hidden states after the given 1-based blocks, as in HF `hidden_states[l]`.

    Layer L (the last of the full model) is the post-norm state, as HF reports it; `final=True`
    also returns it under `FINAL`. With `keep_B_S` (B, S) bool, each tensor is `h[keep_B_S]` (N, D)
    in row-major order; otherwise (B, S, D). `layers_keep_B_S` (default `keep_B_S`) selects the
    blocks' states apart from FINAL's: an OPD + OPRD loss reads the LM head's input at every
    response position but the blocks' only in OPRD's window (2,000 of 16K positions in the paper).

    The forward pass goes through the model's own forward, so it works under FSDP, whose hooks live
    on the root module. It runs only the blocks the deepest requested layer needs (the decoder
    reads `config.num_hidden_layers`, lowered for the call) and the LM head for one position only.
    """
    blocks = decoder_layers(model)
    depth = full_depth(model)
    if any(not 1 <= layer <= len(blocks) for layer in layers):
        raise ValueError(f"layers {layers} outside 1..{len(blocks)} of {type(model).__name__}")
    if not layers and not final:
        return {}
    needs_last = final or depth in layers
    captured: dict[int | str, torch.Tensor] = {}

    layers_keep_B_S = keep_B_S if layers_keep_B_S is None else layers_keep_B_S

    def kept(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return h[mask] if mask is not None else h

    # With gradients on, a block's states are selected after the forward, not in its hook: under
    # gradient checkpointing, transformers 5.19 (vLLM's CPU build pins it) runs a block's hooks
    # inside the checkpointed region, so an op in the hook saves a tensor in the forward that the
    # backward's recompute (hooks removed by then) does not, and torch refuses the mismatch (5.25
    # checkpoints `forward` and keeps hooks outside). Holding the full states costs little: the
    # next block saves its input for its own backward anyway; only the deepest lives on alone,
    # until the selection after the forward.
    select_in_hook = not torch.is_grad_enabled()

    def block_hook(layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            captured[layer] = kept(h, layers_keep_B_S) if select_in_hook else h

        return hook

    def last_hook(module, args, output):  # on the decoder, outside any checkpointed block
        last = output.last_hidden_state
        if final:
            captured[FINAL] = kept(last, keep_B_S)
        if depth in layers:
            same = final and layers_keep_B_S is keep_B_S
            captured[depth] = captured[FINAL] if same else kept(last, layers_keep_B_S)

    decoder = base_model(model)
    handles = [blocks[layer - 1].register_forward_hook(block_hook(layer)) for layer in layers if layer < depth]
    if needs_last:
        handles.append(decoder.register_forward_hook(last_hook))
    head = {"logits_to_keep": 1} if model is not decoder else {}
    try:
        with running_blocks(decoder, len(blocks) if needs_last else max(layers)):
            model(**inputs, use_cache=False, **head)
    finally:
        for handle in handles:
            handle.remove()
    if not select_in_hook:
        captured.update({layer: kept(h, layers_keep_B_S) for layer, h in captured.items()
                         if layer != FINAL and layer < depth})
    return captured


@contextmanager
def running_blocks(decoder: torch.nn.Module, count: int) -> Iterator[None]:
    """Makes the decoder run only its first `count` blocks for the duration of the block."""
    config = decoder.config
    loaded = config.num_hidden_layers
    config.num_hidden_layers = min(count, loaded)
    try:
        yield
    finally:
        config.num_hidden_layers = loaded
