"""The toy reasoning world of `oprd demo`: a task, a tokenizer, a teacher and a student, shipped
inside the package (built once, hashed) and installed in a cache on first use; or built offline
and reproducibly on this machine.

  make_problem, make_split         the toy task: chains of modular arithmetic, solved step by step
  sft                              supervised fine-tuning on (prompt, solution) pairs; also the
                                   demo's sequence-level KD baseline
  measure                          the toy's accuracy protocol (Avg@k at a fixed temperature and seed)
  build_world                      task files + tokenizer + teacher + student: shipped or built, cached
  ship_world                       a built world (and what the demos built beside it) as package data
  build_teacher                    the bridge demo's teachers of other shapes and tokenizers

The toy task ("chain"): start from a digit and apply 4-7 operations (+, -, *) with single-digit
operands, mod 10, left to right. The solution writes one line per operation and ends in
`\\boxed{d}`. A commutative step may be written either way round (`3*7=1` or `7*3=1`), at random
in the training solutions, so the teacher has a real choice at each such line instead of one
right next token everywhere: a one-hot teacher makes sampled-token rewards extreme, and real
reasoning teachers are not one-hot. Each line is a small lookup (the previous result, the next
operation from the prompt, a table fact), but errors compound over the chain: a model that is
right 90% of the time per line solves about half of the 6-step chains, one that is right 99%
nearly all. That keeps a wide, graded teacher-student gap on a model small enough to train on a
laptop CPU.

The student is the teacher's own earlier checkpoint (same architecture, same initialisation), as
the paper's teacher was RL-trained from its student; so hidden states are aligned and
OPRD-Vanilla applies. Both are chosen from one SFT run by accuracy on a validation split, not by
step numbers: the teacher is the first checkpoint at or above `teacher_target`, the student the
last one at or below `student_target` before it (the nearest ones where a target is missed). The
learning curve jumps steeply, so a fixed step lands at very different accuracies when rounding
differs (thread counts, kernels, torch versions); a target does not. Every build also runs on
`BUILD_THREADS` CPU threads with torch's deterministic kernels (`reproducible_build`), so on one
install the world does not depend on the thread settings of the process that builds it. Another
CPU or torch build still trains another pair (other steps, other accuracies), which is why the
demos' worlds are shipped: `build_world` installs them, `--rebuild-world` builds one here.
`ModelRecipe` names how each model of the world is made, so other pairs (a deeper or wider
teacher, another initialisation, another tokenizer) can be added as new recipes without touching
the task or the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from oprd.capture import model_inputs
from oprd.data import Problem, load_problems, prompt_token_ids
from oprd.evaluation.harness import evaluate
from oprd.files import write_dir_atomically
from oprd.rollout import HFRollout, SamplingParams, seeded
from oprd.runs.checkpoint import save_model_dir
from oprd.testing import tiny_config, train_char_tokenizer, train_tokenizer

TOY_VERSION = 3  # bump when the task, the SFT or the world layout changes: it is part of the cache key
# Every world and bridge teacher is built on this many CPU threads: how torch splits a reduction
# across threads changes its rounding, and SFT across a steep learning curve amplifies it.
BUILD_THREADS = 2


# --------------------------------------------------------------------------- the task

OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}


@dataclass(frozen=True)
class ToyProblem:
    prompt: str
    solution: str  # step by step, ending in \boxed{answer}
    answer: str


def make_problem(rng: random.Random, min_steps: int = 4, max_steps: int = 7, operations: str = "+-*") -> ToyProblem:
    """One chain: a start digit and `min_steps..max_steps` operations drawn from `operations`, mod
    10, left to right; a commutative step (+, *) is written with its operands in either order, at random."""
    value = rng.randrange(10)
    ops = [(rng.choice(operations), rng.randrange(1, 10)) for _ in range(rng.randint(min_steps, max_steps))]
    chain = "".join(f"{op}{b}" for op, b in ops)
    prompt = f"Compute {value}{chain} left to right, mod 10."
    lines = []
    for op, b in ops:
        result = OPS[op](value, b)
        left, right = (b, value) if op != "-" and rng.random() < 0.5 else (value, b)
        lines.append(f"{left}{op}{right}={result}")
        value = result
    return ToyProblem(prompt, "\n".join(lines) + f"\nSo \\boxed{{{value}}}", str(value))


def make_split(n: int, seed: int, exclude: set[str] | None = None, **kwargs) -> list[ToyProblem]:
    """`n` distinct problems from `seed`, none of whose prompts is in `exclude`."""
    rng, seen, problems = random.Random(seed), set(exclude or ()), []
    while len(problems) < n:
        problem = make_problem(rng, **kwargs)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems


def write_problems(problems: list[ToyProblem], path: Path, source: str | list[str] = "oprd-toy-chain") -> None:
    """verl layout (`prompt` = chat messages, `reward_model.ground_truth`), read by `load_problems`;
    `source`: every row's data_source, or each row's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "data_source": source if isinstance(source, str) else source[i],
            "prompt": [{"role": "user", "content": p.prompt}],
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"index": i, "solution": p.solution},
        }
        for i, p in enumerate(problems)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


# --------------------------------------------------------------------------- supervised training


def sft_examples(tokenizer, pairs: Iterable[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(ids, prompt_length) per (prompt, response) pair, chat template applied, EOS appended."""
    examples = []
    for prompt, response in pairs:
        head = prompt_token_ids(tokenizer, [{"role": "user", "content": prompt}])
        tail = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        examples.append((head + tail, len(head)))
    return examples


def _sft_batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):  # right padding: positions start at 0
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])  # loss on the response only
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def sft(
    model: torch.nn.Module,
    examples: list[tuple[list[int], int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    seed: int,
    warmup: int = 0,
    callback: Callable[[int, float], bool | None] | None = None,
) -> int:
    """Supervised fine-tuning, next-token loss on response tokens, AdamW at a constant lr after
    a linear warm-up, for `steps` steps; returns the steps taken. `callback(step, loss)` runs after
    each step and ends the run early by returning True.

    Batches are drawn from a seeded generator, so the same call on the same machine trains the
    same model.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        picked = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        batch = _sft_batch([examples[i] for i in picked], pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        loss = model(**batch).loss  # mean over response tokens of the batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if callback is not None and callback(step, loss.item()):
            break
    model.eval()
    return step


# --------------------------------------------------------------------------- measuring a model


@dataclass(frozen=True)
class ModelRecipe:
    """How one model of the world is made: an architecture, an initialisation and at most
    `max_steps` of SFT (the run stops at the first checkpoint that reaches the teacher target).

    The same-architecture pair is one recipe trained once: the teacher and the student are two of
    its checkpoints. Cross-architecture or cross-initialisation teachers are further recipes of
    their own (other sizes, another `init_seed`).
    """

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    init_seed: int = 0
    max_steps: int = 1000


@dataclass(frozen=True)
class WorldSettings:
    seed: int = 0
    train_problems: int = 4000
    validation_problems: int = 200  # checkpoint selection and the demo's tuning read these
    test_problems: int = 200  # only the reported numbers read these
    min_ops: int = 4
    max_ops: int = 7
    vocab_size: int = 300
    model: ModelRecipe = field(default_factory=ModelRecipe)
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    checkpoint_every: int = 20  # SFT steps between the checkpoints measured on the validation split
    # The teacher is the first checkpoint at or above teacher_target and the student the last one at
    # or below student_target before it: a wide accuracy gap between two points of one run, a short
    # walk apart in weight space, as the paper's RL-trained teacher is from its student.
    teacher_target: float = 0.85
    student_target: float = 0.25
    # The toy's accuracy protocol, the same for every model the demos report: Avg@k of k samples
    # per problem at this temperature, sampled from this seed.
    eval_samples: int = 4
    eval_temperature: float = 0.7
    eval_seed: int = 0

    def key(self) -> str:
        text = json.dumps({"version": TOY_VERSION, "threads": BUILD_THREADS, **dataclasses.asdict(self)},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def max_response_tokens(self) -> int:
        # the longest chain's solution is about 6 tokens per operation plus the boxed answer
        return 8 * self.max_ops + 16


# A reduced world for tests (built in under a minute): chains of 1-2 steps and a 2-layer model
QUICK_WORLD = WorldSettings(
    train_problems=1000, validation_problems=32, test_problems=64, min_ops=1, max_ops=2, lr=1e-2,
    model=ModelRecipe(hidden_size=64, num_layers=2, intermediate_size=128, max_steps=800),
    checkpoint_every=20, teacher_target=0.6, student_target=0.25, eval_samples=2,
)


def measure(model: torch.nn.Module, tokenizer, problems: list[Problem], settings: WorldSettings, *,
            seed: int | None = None, progress=None, description: str = "eval") -> dict:
    """The toy's accuracy protocol on `problems`: Avg@k, Best@k, Dist-4g, Avg Len, format errors.
    `seed` (default: the protocol's) seeds the sampling."""
    params = SamplingParams(temperature=settings.eval_temperature, max_new_tokens=settings.max_response_tokens,
                            n=settings.eval_samples)
    was_training = model.training
    model.eval()
    result = evaluate(HFRollout.for_model(model, tokenizer), tokenizer, problems, params,
                      seed=settings.eval_seed if seed is None else seed, progress=progress, description=description)
    model.train(was_training)
    return protocol_numbers(result.metrics, settings.eval_samples)


def protocol_numbers(metrics: dict, k: int, prefix: str = "") -> dict:
    """The toy's names for an evaluation's metrics (`prefix`: e.g. the trainer's "val/test/")."""
    return {"accuracy": metrics[f"{prefix}avg@{k}"], "best_at_k": metrics[f"{prefix}best@{k}"],
            "dist_4g": metrics[f"{prefix}dist-4g"], "avg_len": metrics[f"{prefix}avg_len"], "k": k,
            "format_error_rate": metrics[f"{prefix}format_error_rate"]}


@torch.no_grad()
def mean_entropy(model: torch.nn.Module, tokenizer, problems: list[Problem], settings: WorldSettings) -> float:
    """Mean next-token entropy (nats) of `model` over its own samples at temperature 1, one per
    problem: how far from one-hot its distribution is where it writes."""
    prompts = [prompt_token_ids(tokenizer, p.messages) for p in problems]
    params = SamplingParams(temperature=1.0, max_new_tokens=settings.max_response_tokens, n=1)
    with seeded(settings.eval_seed):
        batch = HFRollout.for_model(model.eval(), tokenizer).generate(prompts, params)
    T = batch.response_ids.shape[1]
    logp = torch.log_softmax(model(**model_inputs(batch)).logits[:, -T:].float(), dim=-1)
    entropy_B_T = -(logp.exp() * logp).sum(-1)
    mask = batch.response_mask.float()
    return float((entropy_B_T * mask).sum() / mask.sum())


# --------------------------------------------------------------------------- the world, cached


@contextmanager
def reproducible_build() -> Iterator[None]:
    """`BUILD_THREADS` CPU threads and torch's deterministic kernels while a world or a teacher is
    built; the process's own settings after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def pick_checkpoints(curve: list[tuple[int, float]], teacher_target: float,
                     student_target: float) -> tuple[int | None, int | None]:
    """(student step, teacher step) from an SFT run's (step, validation accuracy) checkpoints: the
    teacher is the first at or above `teacher_target`, else the most accurate (the earliest on ties);
    the student the last at or below `student_target` before it, else the least accurate before it
    (the latest on ties). Another CPU's rounding moves a steep learning curve, so a target it misses
    picks the nearest checkpoint rather than stopping the build (`World.missed_targets` says so).
    None only where no checkpoint qualifies: no curve, or none before the teacher."""
    if not curve:
        return None, None
    teacher = next((step for step, accuracy in curve if accuracy >= teacher_target), None)
    if teacher is None:
        teacher = max(curve, key=lambda point: (point[1], -point[0]))[0]
    before = [(step, accuracy) for step, accuracy in curve if step < teacher]
    student = next((step for step, accuracy in reversed(before) if accuracy <= student_target), None)
    if student is None and before:
        student = min(before, key=lambda point: (point[1], -point[0]))[0]
    return student, teacher


@dataclass
class SFTRun:
    """An SFT run to the teacher target: the teacher, the student's weights, the measured curve."""

    teacher: torch.nn.Module
    teacher_step: int
    student_state: dict[str, torch.Tensor] | None
    student_step: int | None
    curve: list[tuple[int, float]]  # (step, validation accuracy) of every measured checkpoint


def train_to_targets(recipe: ModelRecipe, settings: WorldSettings, tokenizer, examples, validation: list[Problem],
                     name: str, progress=None, start: torch.nn.Module | None = None) -> SFTRun:
    """A Qwen3 model of `recipe`'s shape, initialised from `recipe.init_seed` (or a copy of
    `start`), trained by SFT for at most `recipe.max_steps` until a checkpoint reaches the teacher
    target on `validation`; the teacher and the student are picked from that run's checkpoints by
    `pick_checkpoints`, the nearest ones where a target was missed."""
    if start is not None:
        model = copy.deepcopy(start)
    else:
        config = tiny_config(
            len(tokenizer), hidden_size=recipe.hidden_size, num_layers=recipe.num_layers, num_heads=recipe.num_heads,
            num_kv_heads=recipe.num_kv_heads, intermediate_size=recipe.intermediate_size,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.init_seed)
            model = AutoModelForCausalLM.from_config(config)
    curve: list[tuple[int, float]] = []
    # every checkpoint's weights (a few MB each): any may be picked when a target is missed
    states: dict[int, dict[str, torch.Tensor]] = {}
    task = progress.add_task(f"toy world: SFT {name}", total=recipe.max_steps) if progress else None

    def checkpoint(step: int, loss: float) -> bool:
        if progress:
            progress.update(task, completed=step)
        if step % settings.checkpoint_every:
            return False
        accuracy = measure(model, tokenizer, validation, settings)["accuracy"]
        curve.append((step, accuracy))
        states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return accuracy >= settings.teacher_target

    sft(model, examples, steps=recipe.max_steps, batch_size=settings.batch_size, lr=settings.lr,
        pad_id=tokenizer.pad_token_id, seed=settings.seed, warmup=settings.warmup, callback=checkpoint)
    student_step, teacher_step = pick_checkpoints(curve, settings.teacher_target, settings.student_target)
    if teacher_step is None:
        raise RuntimeError(f"the toy {name}'s SFT measured no checkpoint in max_steps={recipe.max_steps} steps: "
                           f"lower checkpoint_every={settings.checkpoint_every} or raise max_steps")
    model.load_state_dict(states[teacher_step])  # the last checkpoint, unless the target was missed
    return SFTRun(model.eval(), teacher_step, states.get(student_step), student_step, curve)


@dataclass
class World:
    root: Path
    settings: WorldSettings
    info: dict

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def origin(self) -> str:
        """"shipped" (with oprd) or "built" (here; a world.json from before worlds were shipped says neither)."""
        return self.info.get("origin", "built")

    @property
    def fingerprint(self) -> str:
        """A hash of the teacher's and the student's weights: tells two builds of one world apart."""
        return hashlib.sha256("".join(_sha256(self.root / name / "model.safetensors")
                                      for name in ("teacher", "student")).encode()).hexdigest()[:16]

    @property
    def missed_targets(self) -> list[str]:
        """The models whose validation accuracy missed their target (`pick_checkpoints` took the
        nearest checkpoint): empty for a world built as intended."""
        s, info = self.settings, self.info
        missed = []
        if info["teacher"]["validation_accuracy"] < s.teacher_target:
            missed.append(f"teacher below teacher_target={s.teacher_target}")
        if info["student"]["validation_accuracy"] > s.student_target:
            missed.append(f"student above student_target={s.student_target}")
        return missed

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def train_path(self) -> Path:
        return self.root / "train.parquet"

    @property
    def validation_path(self) -> Path:
        return self.root / "validation.parquet"

    @property
    def test_path(self) -> Path:
        return self.root / "test.parquet"


# The bridge demo's teachers, each paired with the world's student (4 x 64, BPE, init seed 0), each
# trained to the world's teacher target, so every pair has a teacher of the same strength.
BRIDGE_TEACHERS = {
    # deeper and wider: OPD still applies (same tokenizer), OPRD-Vanilla cannot (other width)
    "cross_arch": (ModelRecipe(hidden_size=96, num_layers=6, intermediate_size=384, max_steps=2000), "bpe"),
    # the student's architecture from another random initialisation: no shared representation
    "cross_init": (ModelRecipe(init_seed=1, max_steps=2000), "bpe"),
    # a character-level tokenizer: no OPD, positions matched by character offsets
    "cross_tokenizer": (ModelRecipe(init_seed=2, max_steps=2000), "char"),
}


def build_teacher(world: World, name: str, recipe: ModelRecipe | None = None, tokenizer_kind: str | None = None,
                  progress=None) -> Path:
    """A bridge-demo teacher of the world (`BRIDGE_TEACHERS[name]` unless given), trained to the
    world's teacher target: shipped with the world, or built once and cached beside it; returns its
    folder (model, tokenizer and teacher.json: its SFT curve, chosen step and accuracies)."""
    default_recipe, default_kind = BRIDGE_TEACHERS.get(name, (None, "bpe"))
    recipe, tokenizer_kind = recipe or default_recipe, tokenizer_kind or default_kind
    if recipe is None:
        raise ValueError(f"unknown toy teacher {name!r}; known: {sorted(BRIDGE_TEACHERS)}")
    key = hashlib.sha256(json.dumps([dataclasses.asdict(recipe), tokenizer_kind]).encode()).hexdigest()[:8]
    root = world.root / f"teacher-{name}-{key}"
    if (root / "config.json").is_file():
        return root
    if tokenizer_kind not in ("bpe", "char"):
        raise ValueError(f"tokenizer kind must be bpe or char, got {tokenizer_kind!r}")
    settings = world.settings
    train = train_split(settings)

    def fill(tmp: Path) -> None:
        if tokenizer_kind == "char":
            tokenizer = train_char_tokenizer([p.prompt + "\n" + p.solution for p in train], tmp)
        else:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(world.tokenizer))
        examples = sft_examples(tokenizer, [(p.prompt, p.solution) for p in train])
        run = train_to_targets(recipe, settings, tokenizer, examples, load_problems(str(world.validation_path)),
                               f"{name} teacher", progress)
        run.teacher.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"step": run.teacher_step, "sft_curve": curve_records(run.curve),
                **_accuracies(run.teacher, tokenizer, world, progress, f"{name} teacher")}
        (tmp / "teacher.json").write_text(json.dumps(info, indent=2))

    with reproducible_build():
        return write_dir_atomically(root, fill)  # an interrupted build never leaves a half-written teacher


def cache_root() -> Path:
    """$OPRD_CACHE_DIR, else $XDG_CACHE_HOME/oprd, else ~/.cache/oprd."""
    if os.environ.get("OPRD_CACHE_DIR"):
        return Path(os.environ["OPRD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oprd"


def train_split(settings: WorldSettings) -> list[ToyProblem]:
    return make_split(settings.train_problems, settings.seed * 3 + 1, min_steps=settings.min_ops,
                      max_steps=settings.max_ops)


def held_out_splits(settings: WorldSettings, train: list[ToyProblem]) -> tuple[list[ToyProblem], list[ToyProblem]]:
    """(validation, test): disjoint from each other and from `train`."""
    shape = {"min_steps": settings.min_ops, "max_steps": settings.max_ops}
    seen = {p.prompt for p in train}
    validation = make_split(settings.validation_problems, settings.seed * 3 + 2, exclude=seen, **shape)
    test = make_split(settings.test_problems, settings.seed * 3 + 3, exclude=seen | {p.prompt for p in validation},
                      **shape)
    return validation, test


def curve_records(curve: list[tuple[int, float]]) -> list[dict]:
    return [{"step": step, "validation_accuracy": accuracy} for step, accuracy in curve]


def _accuracies(model: torch.nn.Module, tokenizer, world: World, progress, name: str) -> dict:
    """A chosen model's accuracy on the validation and the test split (the toy's protocol)."""
    measured = {split: measure(model, tokenizer, load_problems(str(path)), world.settings, progress=progress,
                               description=f"toy world: {name} on {split}")
                for split, path in (("validation", world.validation_path), ("test", world.test_path))}
    return {"validation_accuracy": measured["validation"]["accuracy"], "test_accuracy": measured["test"]["accuracy"],
            "validation": measured["validation"], "test": measured["test"]}


def software() -> dict:
    """What a build's numbers depend on beyond its settings."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def problems_sha256(problems: list[ToyProblem]) -> str:
    """A hash of a split's problems (not of its parquet file, whose bytes vary with pyarrow)."""
    text = json.dumps([[p.prompt, p.solution, p.answer] for p in problems])
    return hashlib.sha256(text.encode()).hexdigest()


def splits(settings: WorldSettings) -> dict[str, list[ToyProblem]]:
    train = train_split(settings)
    return dict(zip(("train", "validation", "test"), (train, *held_out_splits(settings, train))))


def write_splits(made: dict[str, list[ToyProblem]], folder: Path) -> dict[str, str]:
    """`splits`' problems as train / validation / test.parquet in `folder`; returns each split's
    `problems_sha256`."""
    for split, problems in made.items():
        write_problems(problems, folder / f"{split}.parquet")
    return {split: problems_sha256(problems) for split, problems in made.items()}


def build_world(settings: WorldSettings = WorldSettings(), progress=None, *, rebuild: bool = False) -> World:
    """The toy world for `settings`: from the cache; else the one shipped with oprd (`SHIPPED_WORLDS`),
    installed in the cache; else built (reproducibly) and cached. `rebuild` builds it afresh
    whether shipped or not, in a cache folder of its own (`toy-KEY-rebuilt`, replaced at every
    rebuild): to check the shipped world, or to see what this machine's rounding makes of it.

    Built in a temporary folder and renamed into place, so an interrupted build never leaves a
    half-written world behind. `progress` (a rich Progress) shows the SFT steps and measurements.
    world.json records the SFT curve, the chosen teacher and student checkpoints, their validation
    and test accuracy, and where the world came from (`origin`).
    """
    root = cache_root() / f"toy-{settings.key()}"
    if rebuild:
        return _build_world(settings, root.with_name(f"{root.name}-rebuilt"), progress)
    shipped = shipped_world(settings)
    if (root / "world.json").is_file():
        info = json.loads((root / "world.json").read_text())
        # a world built here before this one was shipped is replaced: every machine gets the same one
        if shipped is None or info.get("manifest_sha256") == _manifest_sha256(shipped):
            return World(root, settings, info)
    if shipped is not None:
        return install_shipped_world(shipped, root, settings)
    return _build_world(settings, root, progress)


def _build_world(settings: WorldSettings, root: Path, progress) -> World:
    started = time.perf_counter()
    made = splits(settings)
    train, test = made["train"], made["test"]
    info = {
        "origin": "built",
        "settings": dataclasses.asdict(settings),
        "version": TOY_VERSION,
        "build_threads": BUILD_THREADS,
        "software": software(),
        "example": {"prompt": test[0].prompt, "solution": test[0].solution, "answer": test[0].answer},
    }

    def fill(tmp: Path) -> None:
        info["problems_sha256"] = write_splits(made, tmp)
        tokenizer = train_tokenizer(
            (p.prompt + "\n" + p.solution for p in train), settings.vocab_size, tmp / "tokenizer", split_digits=True
        )
        examples = sft_examples(tokenizer, [(p.prompt, p.solution) for p in train])
        run = train_to_targets(settings.model, settings, tokenizer, examples,
                               load_problems(str(tmp / "validation.parquet")), "teacher", progress)
        if run.student_state is None:
            raise RuntimeError(
                f"the teacher was picked at the first checkpoint (step {run.teacher_step}), so no checkpoint before it "
                f"can be the student: lower checkpoint_every={settings.checkpoint_every}")
        student = AutoModelForCausalLM.from_config(run.teacher.config)
        student.load_state_dict(run.student_state)
        in_progress = World(tmp, settings, info)
        for name, model, step in (("teacher", run.teacher, run.teacher_step),
                                  ("student", student.eval(), run.student_step)):
            save_model_dir(tmp / name, model, tokenizer)
            info[name] = {"step": step, **_accuracies(model, tokenizer, in_progress, progress, name)}
        info["sft_curve"] = curve_records(run.curve)
        info["teacher_entropy_nats"] = mean_entropy(run.teacher, tokenizer, load_problems(str(tmp / "test.parquet")),
                                                    settings)
        info["build_seconds"] = time.perf_counter() - started
        (tmp / "world.json").write_text(json.dumps(info, indent=2))

    with reproducible_build():
        write_dir_atomically(root, fill)  # an interrupted build never leaves a half-written world
    return World(root, settings, info)


# --------------------------------------------------------------------------- the world, shipped

# Worlds built once and shipped inside the package, so every machine starts from the same teacher and
# student (a steep SFT curve lands elsewhere under another CPU's rounding). Each folder is named as
# its cache folder and holds what a build writes except the problem files, which are made again from
# their seed and checked against world.json's hashes, plus manifest.json: every file's SHA-256.
SHIPPED_WORLDS = "worlds"  # beside this module
MANIFEST = "manifest.json"
REGENERATED = ("train.parquet", "validation.parquet", "test.parquet")  # made from the settings' seed, not shipped


def shipped_world(settings: WorldSettings) -> Path | None:
    """The shipped folder of the world for `settings`, or None when none is shipped."""
    folder = Path(str(resources.files("oprd.experiments") / SHIPPED_WORLDS)) / f"toy-{settings.key()}"
    return folder if (folder / MANIFEST).is_file() else None


def _manifest_sha256(shipped: Path) -> str:
    return hashlib.sha256((shipped / MANIFEST).read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_shipped_world(shipped: Path, root: Path, settings: WorldSettings) -> World:
    """Copies the shipped world into the cache at `root` after checking every file against the
    manifest, and writes its problem files, checked against the hashes in world.json."""
    files = json.loads((shipped / MANIFEST).read_text())["files"]
    info = json.loads((shipped / "world.json").read_text())

    def fill(tmp: Path) -> None:
        for name, digest in files.items():
            source = shipped / name
            if not source.is_file() or _sha256(source) != digest:
                raise RuntimeError(f"the shipped toy world's {source} is {'changed' if source.is_file() else 'missing'}"
                                   f" (manifest {shipped / MANIFEST}): reinstall oprd, or build the world here "
                                   "with `oprd demo --rebuild-world`")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        hashes = write_splits(splits(settings), tmp)
        if hashes != info["problems_sha256"]:
            raise RuntimeError(f"this Python generates other toy problems than the shipped world's ({hashes} against "
                               f"{info['problems_sha256']}): build the world here with `oprd demo --rebuild-world`")
        info.update(origin="shipped", manifest_sha256=_manifest_sha256(shipped))
        (tmp / "world.json").write_text(json.dumps(info, indent=2))

    write_dir_atomically(root, fill)
    return World(root, settings, info)


def ship_world(world: World, folder: Path) -> Path:
    """Writes `world` (its cache folder: the pair, the tokenizer and whatever the demos built beside
    it, e.g. bridge teachers and specialists) to `folder` as a shipped world with its manifest;
    problem files and data made from seeds are left out."""
    def fill(tmp: Path) -> None:
        files = {}
        for path in sorted(world.root.rglob("*")):
            name = path.relative_to(world.root).as_posix()
            if not path.is_file() or name in REGENERATED or name.startswith((".", "halves-")):
                continue  # made from seeds, or a build's temporary folder
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / name)
            files[name] = _sha256(path)
        info = json.loads((tmp / "world.json").read_text())
        for key in ("origin", "manifest_sha256"):
            info.pop(key, None)
        info["problems_sha256"] = {split: problems_sha256(problems)
                                   for split, problems in splits(world.settings).items()}
        (tmp / "world.json").write_text(json.dumps(info, indent=2))
        files["world.json"] = _sha256(tmp / "world.json")
        (tmp / MANIFEST).write_text(json.dumps({"world": folder.name, "files": files}, indent=2))

    return write_dir_atomically(folder, fill)


def world_summary(world: World) -> str:
    info = world.info
    text = "; ".join(f"{name}: SFT step {info[name]['step']}, validation {100 * info[name]['validation_accuracy']:.1f}"
                     f" / test {100 * info[name]['test_accuracy']:.1f}" for name in ("teacher", "student"))
    missed = f"; missed its targets: {', '.join(world.missed_targets)}" if world.missed_targets else ""
    return f"{text}{missed} ({world.origin}, {world.root})"


def compare_worlds(a: dict, b: dict) -> list[list[str]]:
    """Rows (model, field, a, b) of two worlds' chosen checkpoints: SFT step and accuracies."""
    rows = []
    for name in ("teacher", "student"):
        for key in ("step", "validation_accuracy", "test_accuracy"):
            show = (lambda v: str(v)) if key == "step" else (lambda v: f"{100 * v:.1f}")
            rows.append([name, key, show(a[name][key]), show(b[name][key])])
    return rows
