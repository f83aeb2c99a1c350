"""Checks before training, from the cheapest up.

  check_model_pairing   configs and tokenizers only: can the chosen objectives pair these two
                        models? Runs before gigabytes of weights load.
  check_context_length  do the longest prompt and the longest response fit both context windows?
  preflight_alignment   the student's and the teacher's hidden states on a few of the student's
                        own rollouts, compared at OPRD's positions (through a bridge when set)
  preflight_warning     what to say when they share little: OPRD-Vanilla would collapse
"""

from __future__ import annotations

import torch

from oprd.alignment import paired_states
from oprd.batch import RolloutBatch
from oprd.config import TrainConfig, require
from oprd.data import PromptSet
from oprd.objective import LossPlan


def check_model_pairing(cfg: TrainConfig, student_config, teacher_config, student_tok, teacher_tok,
                        bridge_path: str | None = None, bridge_field: str = "bridge.path") -> list[str]:
    """Checks that the chosen objectives can pair these two models (through the bridge at
    `bridge_path`, the option `bridge_field`); returns warnings to report.

    Reads configs and tokenizers only, so a bad pairing fails before gigabytes of weights load.
    """
    warnings: list[str] = []
    same_tokens = student_tok.get_vocab() == teacher_tok.get_vocab()
    if not same_tokens:
        differ = f"the student and teacher tokenizers differ ({len(student_tok)} vs {len(teacher_tok)} tokens)"
        require(not cfg.uses_opd,
                f"opd.objective={cfg.opd.objective} compares next-token distributions over one vocabulary, but "
                f"{differ}. Across tokenizers only OPRD-Bridge can distil: set opd.objective=none, oprd.coef > 0 and "
                "bridge.path=FILE (fit one with `oprd bridge fit`).")
        require(bridge_path is not None,
                f"OPRD-Vanilla compares hidden states position by position, but {differ}, so positions do not "
                f"correspond. Fit an OPRD-Bridge with `oprd bridge fit` and pass {bridge_field}=FILE: it matches "
                "positions by character offsets.")
        warnings.append(f"{differ}: the teacher re-reads each response's text with its own tokenizer and prompt "
                        "template; OPRD uses the positions at which both have read the same text")
    for name in ("eos_token", "bos_token", "pad_token"):
        a, b = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if a != b:
            warnings.append(f"student and teacher tokenizers differ in {name}: {a!r} vs {b!r}")
    if same_tokens and getattr(student_tok, "chat_template", None) != getattr(teacher_tok, "chat_template", None):
        warnings.append("student and teacher chat templates differ: prompts are rendered with the student's, "
                        "so the teacher reads a template it may not have been trained on")
    vocab = len(student_tok)
    for side, config, tokenizer in (("student", student_config, student_tok), ("teacher", teacher_config, teacher_tok)):
        require(config.vocab_size >= len(tokenizer),
                f"{side} model has {config.vocab_size} embedding rows, fewer than its tokenizer's {len(tokenizer)} "
                f"tokens: {side}.tokenizer does not belong to {side}.model")
    if cfg.opd.objective == "topk":
        require(cfg.opd.k <= vocab, f"opd.k={cfg.opd.k} is larger than the vocabulary ({vocab} tokens); lower opd.k")
    if cfg.uses_oprd and bridge_path is None:
        ds, dt = student_config.hidden_size, teacher_config.hidden_size
        require(ds == dt,
                f"OPRD-Vanilla compares hidden states, but the student's hidden size is {ds} and the teacher's "
                f"{dt}. Fit an OPRD-Bridge (`oprd bridge fit`) and pass {bridge_field}=FILE, "
                "or set oprd.coef=0 and use an OPD objective.")
        layers = cfg.oprd.layers
        if isinstance(layers, list):
            require(max(layers) <= student_config.num_hidden_layers,
                    f"oprd.layers={layers} names a layer beyond the student's {student_config.num_hidden_layers}")
        if student_config.num_hidden_layers != teacher_config.num_hidden_layers:
            warnings.append(
                f"student has {student_config.num_hidden_layers} layers and the teacher "
                f"{teacher_config.num_hidden_layers}: layers are paired by the paper's proportional map (Eq. 11)"
            )
    return warnings


def check_context_length(cfg: TrainConfig, student_config, teacher_config, prompts: PromptSet) -> None:
    """The longest training prompt plus rollout.max_new_tokens must fit each model's context
    window (for a teacher with another tokenizer, its own rendering of the prompts; its re-tokenised
    response may be longer still, so this is the least it needs)."""
    teacher_prompts = prompts.teacher or prompts.student
    for side, config, ids in (("student", student_config, prompts.student),
                              ("teacher", teacher_config, teacher_prompts)):
        context = getattr(config, "max_position_embeddings", None)
        needed = max(len(prompt) for prompt in ids) + cfg.rollout.max_new_tokens
        require(context is None or needed <= context,
                f"the longest prompt ({max(len(p) for p in ids)} tokens) plus rollout.max_new_tokens="
                f"{cfg.rollout.max_new_tokens} is {needed} tokens, more than the {side}'s context window of {context} "
                "positions: lower rollout.max_new_tokens or data.max_prompt_tokens")


def preflight_alignment(plan: LossPlan, student: torch.nn.Module, teacher: torch.nn.Module,
                        batch: RolloutBatch) -> dict[int, float]:
    """{student layer: mean cosine similarity} of the two models' states at OPRD's positions, before
    training; through the bridge's projectors when there is one (what Stage 2 will compare)."""
    keep_B_T = plan.oprd_mask(batch).bool()
    if not keep_B_T.any():
        return {}
    student_h, teacher_h = paired_states(student, teacher, batch, keep_B_T, plan.student_layers, plan.teacher_layers)
    cosines = {}
    for pair in zip(plan.student_layers, plan.teacher_layers):
        student_h_N_D, teacher_h_N_D = student_h[pair[0]].float(), teacher_h[pair[1]].float()
        if plan.bridge is not None:
            student_h_N_D = plan.bridge.project_student(pair, student_h_N_D)
            teacher_h_N_D = plan.bridge.project_teacher(pair, teacher_h_N_D)
        cosines[pair[0]] = float(torch.nn.functional.cosine_similarity(
            student_h_N_D, teacher_h_N_D.to(student_h_N_D.device), dim=-1).mean())
    return cosines


def preflight_warning(cosines: dict[int, float], min_cos: float, bridged: bool) -> str | None:
    if not cosines:
        return None
    mean = sum(cosines.values()) / len(cosines)
    if mean >= min_cos:
        return None
    per_layer = ", ".join(f"layer {layer}: {c:.2f}" for layer, c in cosines.items())
    if bridged:
        return (f"through the bridge, student and teacher states have mean cosine similarity {mean:.2f} before "
                f"training (below oprd.preflight_min_cos={min_cos}; {per_layer}). The bridge fits these models "
                "poorly: refit it on more rollouts or at another rank (`oprd bridge sweep`).")
    return (f"student and teacher hidden states have mean cosine similarity {mean:.2f} before training (below "
            f"oprd.preflight_min_cos={min_cos}; {per_layer}). OPRD-Vanilla matches states position by position and "
            "can collapse when the two models do not share a representation (e.g. a teacher trained from another "
            "initialisation). Fit an OPRD-Bridge (`oprd bridge fit`) and pass bridge.path=FILE, or use an OPD "
            "objective.")
