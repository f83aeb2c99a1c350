"""OPRD-Bridge Stage 1: rollouts of the student, both models' hidden states, one bridge per rank.

    rows, info = stage1_rows(Stage1Settings(student="S", teacher="T", data="prompts.parquet"))
    bridge = fit_bridge_at_rank(rows, 8, settings, info)

The student samples responses to a sample of prompts; both models read them (each with its own
tokenizer when they differ, positions matched by character offsets, `oprd.alignment`), and a
bounded, uniform sample of hidden-state rows is kept per layer pair (`RowReservoir`). Rows are
collected once, so a rank sweep fits one bridge per rank on the same rows, as the paper's rank
study does (`oprd.experiments.bridge_sweep`).

  layer_pairs               (student, teacher) layers by the paper's proportional map (Eq. 11)
  RowReservoir              bounded, paired sample of rows per layer pair (uniform over all rows seen)
  paired_rows_from_batches  rows of both models from rollout batches, across tokenizers too
  Stage1Settings            everything Stage 1 reads (the `oprd bridge fit|sweep` options)
  stage1_rows               models, rollouts and rows from settings, with the metadata a bridge records
  fit_bridge_at_rank        `projector.fit_bridge` on those rows at one rank
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from oprd.alignment import paired_states, positions_with_partner
from oprd.batch import RolloutBatch
from oprd.bridge.projector import Bridge, Pair, bridge_metadata, fit_bridge
from oprd.data import PromptSet, load_problems
from oprd.losses import layer_map
from oprd.models import ModelSpec, check_source, load_model, load_model_config, load_tokenizer, resolve_device
from oprd.rollout import HFRollout, Sampler, SamplingParams

PairedRows = dict[Pair, tuple[torch.Tensor, torch.Tensor]]  # pair -> (student (N, D_S), teacher (N, D_T))


def layer_pairs(
    num_student_layers: int, num_teacher_layers: int, student_layers: Sequence[int] | None = None
) -> list[Pair]:
    """(student, teacher) layer pairs by the paper's proportional map, for all or some student layers."""
    teacher_of = layer_map(num_student_layers, num_teacher_layers)
    chosen = list(student_layers) if student_layers is not None else list(range(1, num_student_layers + 1))
    if any(not 1 <= layer <= num_student_layers for layer in chosen):
        raise ValueError(f"student layers {chosen} outside 1..{num_student_layers}")
    return [(layer, teacher_of[layer - 1]) for layer in chosen]


class RowReservoir:
    """A uniform sample of at most `max_rows` rows per layer pair, over every row ever added.

    Student and teacher rows of one position stay paired: all layer pairs share one set of kept
    positions. Each row draws a uniform key and the `max_rows` smallest keys are kept (bottom-k
    sampling, equivalent to reservoir sampling without replacement), so memory stays at
    `max_rows` rows per layer and the sample does not favour the first rollouts, whose positions
    are strongly correlated. Kept rows are returned in arrival order: with `max_rows` at least the
    number of rows seen, the result is every row, in order. Rows are stored as float32 on CPU.
    """

    def __init__(self, max_rows: int, seed: int = 0):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.rows_seen = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._keys = torch.empty(0)  # (K,)
        self._order = torch.empty(0, dtype=torch.long)  # (K,) arrival index of each kept row
        self._student: dict[Pair, torch.Tensor] = {}  # pair -> (K, D_S)
        self._teacher: dict[Pair, torch.Tensor] = {}  # pair -> (K, D_T)

    def add(self, student_rows: dict[Pair, torch.Tensor], teacher_rows: dict[Pair, torch.Tensor]) -> None:
        """Adds one batch: {pair: (n, D_S)} and {pair: (n, D_T)}, the same n positions for all pairs."""
        if set(student_rows) != set(teacher_rows) or not student_rows:
            raise ValueError("student and teacher rows must cover the same, non-empty set of layer pairs")
        if self._student and set(student_rows) != set(self._student):
            raise ValueError(f"layer pairs changed: {sorted(student_rows)} vs {sorted(self._student)}")
        counts = {t.shape[0] for t in [*student_rows.values(), *teacher_rows.values()]}
        if len(counts) != 1:
            raise ValueError(f"every layer pair needs the same number of rows per batch, got {sorted(counts)}")
        n = counts.pop()
        keys = torch.cat([self._keys, torch.rand(n, generator=self._generator)])
        order = torch.cat([self._order, torch.arange(self.rows_seen, self.rows_seen + n)])
        keep = keys.topk(min(self.max_rows, keys.numel()), largest=False).indices
        keep = keep[order[keep].argsort()]  # arrival order
        self._keys, self._order = keys[keep], order[keep]
        for pair in student_rows:
            for store, new in ((self._student, student_rows[pair]), (self._teacher, teacher_rows[pair])):
                new = new.detach().float().cpu()
                old = store.get(pair, new.new_empty((0, new.shape[-1])))
                store[pair] = torch.cat([old, new])[keep]
        self.rows_seen += n

    def rows(self) -> dict[Pair, tuple[torch.Tensor, torch.Tensor]]:
        """{pair: (student rows (K, D_S), teacher rows (K, D_T))}, K = min(max_rows, rows_seen)."""
        return {pair: (self._student[pair], self._teacher[pair]) for pair in self._student}


@torch.no_grad()
def paired_rows_from_batches(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Iterable[RolloutBatch],
    student_layers: Sequence[int],
    teacher_layers: Sequence[int],
    max_rows: int,
    *,
    seed: int = 0,
) -> PairedRows:
    """Stage 1 rows: {(s, t): (student rows (N, D_S), teacher rows (N, D_T))}.

    For each rollout batch, both models read the sampled tokens (no grad) and the hidden states at
    the response positions (the outputs that predict response tokens, as the trainer's losses read
    them) are captured after student layer s and teacher layer t, for each pair
    zip(student_layers, teacher_layers). Across tokenizers (batches carrying a `TeacherView`, see
    `oprd.alignment.retokenize`) the teacher reads its own tokens of the same text and only
    positions with a partner are kept. Batches are streamed through a `RowReservoir`, so N is at
    most `max_rows` per layer pair, sampled uniformly over all positions seen; the caller bounds
    the compute by the number of batches it yields.
    """
    if len(student_layers) != len(teacher_layers) or not student_layers:
        raise ValueError(
            f"need one teacher layer per student layer, got {list(student_layers)} and {list(teacher_layers)}"
        )
    pairs = list(zip(student_layers, teacher_layers))
    reservoir = RowReservoir(max_rows, seed)
    for batch in batches:
        keep_B_T = positions_with_partner(batch).bool()
        if not keep_B_T.any():
            continue
        student_h, teacher_h = paired_states(student, teacher, batch, keep_B_T, student_layers, teacher_layers)
        reservoir.add({p: student_h[p[0]] for p in pairs}, {p: teacher_h[p[1]] for p in pairs})
    if reservoir.rows_seen == 0:
        raise ValueError("no response positions in the given batches")
    return reservoir.rows()


@dataclass
class Stage1Settings:
    """Everything Stage 1 reads; saved into the bridge's metadata."""

    student: str
    teacher: str
    data: str
    prompts: int = 64  # prompts sampled from `data` (the first N)
    responses_per_prompt: int = 2
    max_new_tokens: int = 512
    temperature: float = 1.0
    batch_prompts: int = 16  # prompts per generate() call
    max_rows: int = 16_384  # rows kept per layer pair (the paper's)
    layers: str = "all"  # all, or comma-separated 1-based student layers
    epochs: int = 20
    lr: float = 1e-2
    holdout: float = 0.1
    normalize_states: bool = True  # fit and project unit-RMS states (oprd.bridge notes); False: the paper's raw states
    enable_thinking: bool | None = None  # handed to both chat templates when set (`data.prompt_token_ids`)
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("prompts", "responses_per_prompt", "max_new_tokens", "batch_prompts", "max_rows", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"--holdout must be in [0, 1), got {self.holdout}")


def _student_layers(layers: str) -> list[int] | None:
    if layers == "all":
        return None
    try:
        return [int(v) for v in layers.split(",")]
    except ValueError:
        raise ValueError(f"--layers must be 'all' or comma-separated layer numbers, got {layers!r}") from None


def stage1_rows(settings: Stage1Settings, console=None) -> tuple[PairedRows, dict]:
    """Stage 1 rows {(s, t): (student rows, teacher rows)} and the metadata a bridge fitted on them records."""
    check_source(settings.student, "--student")
    check_source(settings.teacher, "--teacher")
    device = resolve_device(settings.device)
    student_spec, teacher_spec = (ModelSpec(model=name, trust_remote_code=settings.trust_remote_code)
                                  for name in (settings.student, settings.teacher))
    student_tok, teacher_tok = load_tokenizer(student_spec), load_tokenizer(teacher_spec)
    student_config, teacher_config = load_model_config(student_spec), load_model_config(teacher_spec)
    cross_tokenizer = student_tok.get_vocab() != teacher_tok.get_vocab()
    pairs = layer_pairs(student_config.num_hidden_layers, teacher_config.num_hidden_layers,
                        _student_layers(settings.layers))

    problems = load_problems(settings.data, limit=settings.prompts)
    if not problems:
        raise ValueError(f"{settings.data} has no prompts")
    prompts = PromptSet.render(problems, student_tok, teacher_tok if cross_tokenizer else None,
                               enable_thinking=settings.enable_thinking)

    student = load_model(student_spec, device).eval()
    teacher = load_model(teacher_spec, device).eval()
    sampler = Sampler(HFRollout.for_model(student, student_tok), prompts, student_tok, teacher_tok, device)
    params = SamplingParams(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                            n=settings.responses_per_prompt)
    matched = {"positions": 0, "of": 0}

    def batches() -> Iterator[RolloutBatch]:
        for first in range(0, len(prompts), settings.batch_prompts):
            chosen = list(range(first, min(first + settings.batch_prompts, len(prompts))))
            batch = sampler.sample(chosen, params)
            matched["positions"] += int(positions_with_partner(batch).sum())
            matched["of"] += int(batch.response_mask.sum())
            if console is not None:
                console.print(f"stage 1: rollouts {chosen[-1] + 1}/{len(prompts)} prompts")
            yield batch

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        rows = paired_rows_from_batches(student, teacher, batches(), [p[0] for p in pairs], [p[1] for p in pairs],
                                        settings.max_rows, seed=settings.seed)
    info = bridge_metadata(
        student_config=student_config, teacher_config=teacher_config, student=settings.student,
        teacher=settings.teacher, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok,
        data={"path": settings.data, "prompts": len(problems), "responses_per_prompt": settings.responses_per_prompt},
    )
    info["stage1"] = asdict(settings)
    info["response_tokens"] = matched["of"]
    info["matched_position_share"] = matched["positions"] / matched["of"] if cross_tokenizer and matched["of"] else 1.0
    info["rows_per_pair"] = next(iter(rows.values()))[0].shape[0]
    return rows, info


def fit_bridge_at_rank(rows: PairedRows, rank: int, settings: Stage1Settings, info: dict) -> Bridge:
    """One bridge of `rank` on collected rows (the rank must not exceed either hidden size)."""
    widths = {min(s.shape[1], t.shape[1]) for s, t in rows.values()}
    if rank < 1 or rank > min(widths):
        raise ValueError(f"rank must be in 1..{min(widths)} (the smaller hidden size), got {rank}")
    return fit_bridge({p: s for p, (s, _) in rows.items()}, {p: t for p, (_, t) in rows.items()}, rank,
                      epochs=settings.epochs, lr=settings.lr, holdout=settings.holdout, seed=settings.seed,
                      normalize_states=settings.normalize_states, metadata=info)
