"""Reading hidden states out of a model, as cheaply as the loss allows.

`capture_hidden` serves the frozen teacher (under no_grad) and the student (with grad) alike:
it runs the backbone without the LM head, stops after the deepest block the loss needs, and
keeps only the positions the loss reads. Logits are never computed here; the output-space
losses apply each LM head chunk by chunk (`losses.chunked_head_loss`).
"""

from __future__ import annotations

import torch

from oprd.batch import RolloutBatch
from oprd.models import base_model, decoder_layers

FINAL = "final"  # key of the post-norm last hidden state, the LM head's input


class _StopForward(Exception):
    """Raised from a block's hook once every needed layer is captured."""


def model_inputs(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """The (B, S) inputs, S = P + T - 1, whose outputs predict response tokens 0..T-1.

    The last response column predicts nothing, so it is not fed; the outputs that predict the
    response are then exactly the last T columns.
    """
    return {
        "input_ids": batch.input_ids[:, :-1],
        "attention_mask": batch.attention_mask[:, :-1],
        "position_ids": batch.position_ids[:, :-1],
    }


def response_positions(keep_B_T: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(B, S) bool selecting the model outputs that predict the kept response tokens (B, T)."""
    B = keep_B_T.shape[0]
    lead = torch.zeros((B, prompt_width - 1), dtype=torch.bool, device=keep_B_T.device)
    return torch.cat([lead, keep_B_T.bool()], dim=1)


def capture_hidden(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    layers: list[int],
    keep_B_S: torch.Tensor | None = None,
    final: bool = False,
) -> dict[int | str, torch.Tensor]:
    """Hidden states after the given 1-based blocks, as in HF `hidden_states[l]`.

    Layer L (the last) is the post-norm state, as HF reports it; `final=True` also returns it
    under `FINAL`. With `keep_B_S` (B, S) bool, each tensor is `h[keep_B_S]` (N, D) in row-major
    order; otherwise (B, S, D). When neither layer L nor `final` is asked for, the forward pass
    stops after the deepest requested block.
    """
    blocks = decoder_layers(model)
    num_layers = len(blocks)
    if any(not 1 <= layer <= num_layers for layer in layers):
        raise ValueError(f"layers {layers} outside 1..{num_layers} of {type(model).__name__}")
    needs_last = final or num_layers in layers
    deepest = max(layers, default=0)
    captured: dict[int | str, torch.Tensor] = {}

    def kept(h: torch.Tensor) -> torch.Tensor:
        return h[keep_B_S] if keep_B_S is not None else h

    def hook_for(layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            captured[layer] = kept(h)
            if layer == deepest and not needs_last:
                raise _StopForward

        return hook

    handles = [blocks[layer - 1].register_forward_hook(hook_for(layer)) for layer in layers if layer < num_layers]
    try:
        out = base_model(model)(**inputs, use_cache=False)
        last = kept(out.last_hidden_state)
        if num_layers in layers:
            captured[num_layers] = last
        if final:
            captured[FINAL] = last
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured
