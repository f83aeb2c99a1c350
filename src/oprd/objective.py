"""What one update computes: L = L_OPD + mu * L_OPRD on the student's own rollouts.

  LossPlan            the run's objective, built once from the config and the two models; `at_step`
                      gives the objective of one step of a staged recipe
  score_with_teacher  the frozen teacher reads a batch: no grad, no LM head, only as deep as the
                      loss needs, only at the positions it reads
  student_loss        the student's forward pass and the loss against those scores
  combined_loss       one student forward pass against several teachers' scores (`Term`s), each
                      on its own rows with its own plan (several teachers, routed or averaged)
  distillation_loss   both, on one micro-batch

Output-space losses apply both LM heads chunk by chunk on response positions only
(`losses.chunked_head_loss`), so no (B, T, V) logits of either model are ever held. OPRD-Bridge
(Stage 2) projects both models' states with its frozen projectors, then applies the same
representation loss as OPRD-Vanilla.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from oprd import losses
from oprd.alignment import positions_with_partner, teacher_inputs
from oprd.batch import RolloutBatch
from oprd.bridge.projector import Bridge
from oprd.capture import FINAL, capture_hidden, model_inputs, response_positions
from oprd.config import OPDConfig, OPRDConfig, require, validate_objective


@dataclass(frozen=True)
class LossPlan:
    """What one update computes; built once from the config and the two models."""

    opd: str  # the opd.objective key: none | sampled | topk | full
    topk: int
    topk_support: str
    chunk_size: int  # positions per LM-head chunk; 0: chosen for the device (losses.default_chunk_rows)
    oprd_coef: float  # mu; 0 = off
    normalize: bool
    student_layers: tuple[int, ...]
    teacher_layers: tuple[int, ...]
    positions: str
    positions_k: int
    aggregation: str
    vocab_size: int  # logits beyond the shared tokenizer (embedding padding) are cut off
    opd_start_step: int = 0  # OPD from step opd_start_step + 1 on
    is_ratio_cap: float = 2.0  # sampled-token OPD off-policy: the truncated importance weight's cap
    off_policy: bool = False  # this step's batch was sampled by older weights (`at_step`)
    oprd_stop_step: int = 0  # OPRD up to this step; 0 = always
    bridge: Bridge | None = field(default=None, compare=False)  # OPRD through frozen projectors

    @classmethod
    def from_config(cls, opd: OPDConfig, oprd: OPRDConfig, student_layers: int, teacher_layers: int,
                    vocab_size: int, bridge: Bridge | None = None) -> LossPlan:
        validate_objective(opd, oprd)
        require(bridge is None or oprd.normalize,
                "an OPRD-Bridge compares L2-normalised projections (the paper's Stage 2): set oprd.normalize=true")
        layers: list[int] = []
        if oprd.coef > 0:
            layers = list(oprd.layers) if isinstance(oprd.layers, list) else losses.select_layers(student_layers,
                                                                                                  oprd.layers)
        teacher_of = losses.layer_map(student_layers, teacher_layers)
        if bridge is not None:
            missing = [layer for layer in layers if layer not in bridge.student_layers]
            if missing:
                raise ValueError(f"oprd.layers asks for student layers {missing} that the bridge has no projector for "
                                 f"(it covers {list(bridge.student_layers)})")
            bridged = dict(bridge.pairs)
            teacher_of = [bridged.get(layer, 0) for layer in range(1, student_layers + 1)]
        return cls(
            opd=opd.objective,
            topk=opd.k,
            topk_support=opd.support,
            chunk_size=opd.chunk_size,
            oprd_coef=oprd.coef,
            normalize=oprd.normalize,
            student_layers=tuple(layers),
            teacher_layers=tuple(teacher_of[layer - 1] for layer in layers),
            positions=oprd.positions,
            positions_k=oprd.k,
            aggregation=oprd.aggregation,
            vocab_size=vocab_size,
            opd_start_step=opd.start_step,
            is_ratio_cap=opd.is_ratio_cap,
            oprd_stop_step=oprd.stop_step,
            bridge=bridge,
        )

    def at_step(self, step: int, weight_lag: int = 0) -> LossPlan:
        """The objective of one step of a staged recipe (e.g. OPRD-Bridge first, then OPD), on a batch
        sampled `weight_lag` optimizer steps ago (`rollout.max_weight_lag`)."""
        opd = self.opd if step > self.opd_start_step else "none"
        oprd_coef = self.oprd_coef if not self.oprd_stop_step or step <= self.oprd_stop_step else 0.0
        return dataclasses.replace(self, opd=opd, oprd_coef=oprd_coef, off_policy=weight_lag > 0)

    @property
    def uses_opd(self) -> bool:
        return self.opd != "none"

    @property
    def uses_oprd(self) -> bool:
        return self.oprd_coef > 0

    def oprd_mask(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, T) float: the positions OPRD supervises; across tokenizers, those of them with a partner."""
        k = self.positions_k if self.positions in ("first_k", "last_k") else None
        return losses.position_mask(batch.response_mask, self.positions, k) * positions_with_partner(batch)

    def scored_positions(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, T) bool: the positions both models read: every response position when OPD needs
        them, else only OPRD's."""
        return batch.response_mask.bool() if self.uses_opd else self.oprd_mask(batch).bool()

    def normalizers(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """Denominators of the step's averages, from the whole step's batch."""
        oprd = self.oprd_mask(batch)
        oprd_total = oprd.sum() if self.aggregation == "token" else (oprd.sum(-1) > 0).sum()
        return {"opd": batch.response_mask.sum().float(), "oprd": oprd_total.float()}


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's reading of a batch: hidden states at the positions each use reads (the LM
    head's input at OPD's, the blocks' at OPRD's), and its LM head."""

    hidden: dict[int | str, torch.Tensor]  # FINAL: (N, D_T), N = keep_B_T.sum(); a layer: (M, D_T), M = oprd_B_T.sum()
    keep_B_T: torch.Tensor  # (B, T) bool: the student positions they pair with, in row-major order
    oprd_B_T: torch.Tensor  # (B, T) bool, within keep_B_T: the positions of the layers' rows
    head: torch.nn.Module  # applied chunk by chunk, only when OPD needs the teacher's logits

    def placed(self, rows: torch.Tensor, shape: torch.Size) -> TeacherScores:
        """Scores of the sub-batch `batch.select(rows)` ((R,) increasing row indices), placed in
        the (B, T) batch it was selected from: the same states, in the same row-major order."""
        def place(mask_R_T: torch.Tensor) -> torch.Tensor:
            mask_B_T = torch.zeros(shape, dtype=torch.bool, device=mask_R_T.device)
            mask_B_T[rows, : mask_R_T.shape[1]] = mask_R_T
            return mask_B_T

        return dataclasses.replace(self, keep_B_T=place(self.keep_B_T), oprd_B_T=place(self.oprd_B_T))


@dataclass(frozen=True)
class Term:
    """One teacher's part of a micro-batch's loss: its plan, its scores of the rows it read, and
    the denominators that make its sum its share of the step's loss."""

    plan: LossPlan
    scores: TeacherScores  # keep_B_T over the whole micro-batch
    normalizers: dict[str, torch.Tensor]
    rows_B: torch.Tensor | None = None  # (B,) bool: the rows it scores; None = every row


@torch.no_grad()
def score_with_teacher(plan: LossPlan, teacher: torch.nn.Module, batch: RolloutBatch) -> TeacherScores:
    """The frozen teacher's hidden states at the positions `plan` reads (across tokenizers, the
    teacher reads its own tokens and its states are taken at the partner positions)."""
    keep_B_T, oprd_B_T = plan.scored_positions(batch), plan.oprd_mask(batch).bool()
    inputs, teacher_keep_B_S = teacher_inputs(batch, keep_B_T)
    teacher_oprd_B_S = teacher_keep_B_S if torch.equal(oprd_B_T, keep_B_T) else teacher_inputs(batch, oprd_B_T)[1]
    hidden = capture_hidden(teacher, inputs, list(plan.teacher_layers), teacher_keep_B_S, final=plan.uses_opd,
                            layers_keep_B_S=teacher_oprd_B_S)
    return TeacherScores(hidden, keep_B_T, oprd_B_T, teacher.get_output_embeddings())


def student_loss(
    plan: LossPlan,
    student: torch.nn.Module,
    batch: RolloutBatch,
    scores: TeacherScores,
    normalizers: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_OPD + mu * L_OPRD on one micro-batch, as its share of the step's average.

    Returns the loss (backward-ready) and metrics as weighted sums that add up over micro-batches.
    """
    loss, (metrics,) = combined_loss(student, batch, [Term(plan, scores, normalizers)])
    return loss, metrics


def combined_loss(student: torch.nn.Module, batch: RolloutBatch,
                  terms: list[Term]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The sum of every term's loss from one student forward pass over the micro-batch (the layers
    and positions any term reads); each term's metrics apart, as weighted sums over its rows."""
    keep_B_T = torch.stack([term.scores.keep_B_T for term in terms]).any(0)
    oprd_B_T = torch.stack([term.scores.oprd_B_T for term in terms]).any(0)
    layers = sorted({layer for term in terms for layer in term.plan.student_layers})
    student_h = capture_hidden(student, model_inputs(batch), layers, response_positions(batch, keep_B_T),
                               final=any(term.plan.uses_opd for term in terms),
                               layers_keep_B_S=response_positions(batch, oprd_B_T))
    loss = torch.zeros((), device=batch.response_ids.device)
    all_metrics = []
    for term in terms:
        final_rows_N, layer_rows_N = term.scores.keep_B_T[keep_B_T], term.scores.oprd_B_T[oprd_B_T]
        term_h = {key: _rows(h, final_rows_N if key == FINAL else layer_rows_N) for key, h in student_h.items()}
        term_batch = batch if term.rows_B is None else batch.with_rows_only(term.rows_B)
        term_loss, metrics = _term_loss(term.plan, student, term_batch, term_h, term.scores, term.normalizers)
        loss = loss + term_loss
        all_metrics.append(metrics)
    return loss, all_metrics


def _rows(h_N_D: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    return h_N_D if bool(rows_N.all()) else h_N_D[rows_N]


def _term_loss(plan: LossPlan, student: torch.nn.Module, batch: RolloutBatch, student_h: dict,
               scores: TeacherScores, normalizers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """L_OPD + mu * L_OPRD of one teacher's scores, given the student's states at its positions."""
    loss = torch.zeros((), device=batch.response_ids.device)
    metrics: dict[str, torch.Tensor] = {}
    if plan.uses_opd:
        opd_loss = _output_space_loss(plan, student, batch, student_h[FINAL], scores, normalizers["opd"], metrics)
        metrics["opd/loss"] = opd_loss.detach()
        loss = loss + opd_loss
    if plan.uses_oprd:
        rep_loss = _representation_loss(plan, batch, student_h, scores, normalizers["oprd"], metrics)
        metrics["rep/loss"] = rep_loss.detach()
        loss = loss + plan.oprd_coef * rep_loss
    return loss, metrics


def distillation_loss(
    plan: LossPlan,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: RolloutBatch,
    normalizers: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`student_loss` against the teacher's scores of the same micro-batch."""
    return student_loss(plan, student, batch, score_with_teacher(plan, teacher, batch), normalizers)


def _output_space_loss(plan: LossPlan, student: torch.nn.Module, batch: RolloutBatch, student_final_N_D: torch.Tensor,
                       scores: TeacherScores, total_tokens: torch.Tensor, metrics: dict) -> torch.Tensor:
    """OPD over every response position, both LM heads applied one chunk of positions at a time."""
    response_B_T = batch.response_mask.bool()
    weights_N = (response_B_T.float() / total_tokens.clamp(min=1))[response_B_T]
    targets_N = batch.response_ids[response_B_T]
    sampler_N = None  # the sampling weights' log-probs of the tokens, where the estimator needs its ratio to them
    if plan.off_policy and plan.opd == "sampled":
        if batch.sampled_logprobs is None:
            raise ValueError("sampled-token OPD on a batch of older weights needs the sampler's log-probs of its "
                             "tokens (a vLLM rollout returns them)")
        sampler_N = batch.sampled_logprobs[response_B_T]
    teacher_final_N_D = scores.hidden[FINAL]
    V = plan.vocab_size
    teacher_head = _cast_once(scores.head, student_final_N_D.device.type)

    def chunk_loss(student_logits: torch.Tensor, chunk: slice) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_final_N_D[chunk])[:, :V]
        terms, diagnostics = losses.output_space_terms(
            plan.opd, student_logits[:, :V], teacher_logits, targets_N[chunk], k=plan.topk, support=plan.topk_support,
            sampler_logprobs=None if sampler_N is None else sampler_N[chunk], ratio_cap=plan.is_ratio_cap,
        )
        for name, values in diagnostics.items():
            metrics[name] = metrics.get(name, 0.0) + (values * weights_N[chunk]).sum()
        return (terms * weights_N[chunk]).sum()

    head = student.get_output_embeddings()
    chunk_size = plan.chunk_size or losses.default_chunk_rows(V, student_final_N_D.device.type)
    return losses.chunked_head_loss(student_final_N_D, head.weight, head.bias, chunk_loss, chunk_size)


def _cast_once(head: torch.nn.Module, device_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher's LM head as a function of hidden states, computing as autocast would, with its
    weight cast to the autocast dtype once: autocast keeps the casts of weights that train and casts
    a frozen one again on every call, a whole (V, D) copy for every chunk of positions (at
    r1-distill-1.5b's shape on a CPU, 17 s of a 33 s top-16 OPD update)."""
    if not torch.is_autocast_enabled(device_type):
        return head
    dtype = torch.get_autocast_dtype(device_type)
    weight = head.weight.detach().to(dtype)
    bias = head.bias.detach().to(dtype) if head.bias is not None else None
    return lambda hidden: torch.nn.functional.linear(hidden.to(dtype), weight, bias)


def _representation_loss(plan: LossPlan, batch: RolloutBatch, student_h: dict, scores: TeacherScores,
                         total: torch.Tensor, metrics: dict) -> torch.Tensor:
    """OPRD at its positions, where both models' layer states were captured (`scores.oprd_B_T`)."""
    oprd_B_T = plan.oprd_mask(batch)
    weights_N = losses.row_weights(oprd_B_T, plan.aggregation, total)[oprd_B_T.bool()]
    student_h_N_D = [student_h[layer] for layer in plan.student_layers]
    teacher_h_N_D = [scores.hidden[layer] for layer in plan.teacher_layers]
    if plan.bridge is not None:  # OPRD-Bridge: the same loss on the projected states
        pairs = list(zip(plan.student_layers, plan.teacher_layers))
        student_h_N_D, teacher_h_N_D = plan.bridge.project(pairs, student_h_N_D, teacher_h_N_D)
    rep_loss, rep_metrics = losses.representation_loss_rows(student_h_N_D, teacher_h_N_D, weights_N, plan.normalize)
    for name, value in rep_metrics.items():
        head, sep, pair = name.rpartition("/pair_")
        metrics[f"{head}/layer_{plan.student_layers[int(pair)]}" if sep else name] = value
    return rep_loss
