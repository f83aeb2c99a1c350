"""The toy reasoning world of `oprd demo`: a task, a tokenizer, a teacher and a student, built
offline and deterministically, and cached on disk.

  make_problem, make_split         the toy task: chains of modular arithmetic, solved step by step
  sft                              supervised fine-tuning on (prompt, solution) pairs; also the
                                   demo's sequence-level KD baseline
  build_world                      task files + tokenizer + teacher + student, cached on disk
  build_teacher                    the bridge demo's teachers of other shapes and tokenizers

The toy task ("chain"): start from a digit and apply 4-7 operations (+, -, *) with single-digit
operands, mod 10, left to right. The solution writes one line per operation (`3*7=1`) and ends in
`\\boxed{d}`. Each line is a small lookup (a copy of the previous result, the next operation from
the prompt, a table fact), but errors compound over the chain: a model that is right 90% of the
time per line solves about half of the 6-step chains, one that is right 99% nearly all. That
keeps a wide, graded teacher-student gap on a model small enough to train on a laptop CPU.

The student is the teacher's own earlier checkpoint (same architecture, same initialisation), as
the paper's teacher was RL-trained from its student; so hidden states are aligned and
OPRD-Vanilla applies. The teacher is the checkpoint right after the steep part of the SFT learning
curve (step 500; the student is step 250), not a much longer-trained model: its weights stay close
to the student's, as an RL-tuned teacher's do, and the world builds in about a minute on a CPU.
`ModelRecipe` names how each model of the world is made, so other pairs (a deeper or wider teacher,
another initialisation, another tokenizer) can be added as new recipes without touching the task or
the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from oprd.checkpoint import save_model_dir
from oprd.data import prompt_token_ids
from oprd.files import write_dir_atomically
from oprd.testing import tiny_config, train_char_tokenizer, train_tokenizer

TOY_VERSION = 2  # bump when the task, the SFT or the world layout changes: it is part of the cache key


# --------------------------------------------------------------------------- the task

OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}


@dataclass(frozen=True)
class ToyProblem:
    prompt: str
    solution: str  # step by step, ending in \boxed{answer}
    answer: str


def make_problem(rng: random.Random, min_steps: int = 4, max_steps: int = 7) -> ToyProblem:
    """One chain: a start digit and `min_steps..max_steps` operations, mod 10, left to right."""
    value = rng.randrange(10)
    ops = [(rng.choice("+-*"), rng.randrange(1, 10)) for _ in range(rng.randint(min_steps, max_steps))]
    chain = "".join(f"{op}{b}" for op, b in ops)
    prompt = f"Compute {value}{chain} left to right, mod 10."
    lines = []
    for op, b in ops:
        result = OPS[op](value, b)
        lines.append(f"{value}{op}{b}={result}")
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


def write_problems(problems: list[ToyProblem], path: Path) -> None:
    """verl layout (`prompt` = chat messages, `reward_model.ground_truth`), read by `load_problems`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "data_source": "oprd-toy-chain",
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
    deadline: float | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> int:
    """Supervised fine-tuning, next-token loss on response tokens, AdamW at a constant lr after
    a linear warm-up. Stops after `steps` or at `deadline` (time.perf_counter()), whichever comes
    first; returns the steps taken. `callback(step, loss)` runs after each step.

    Batches are drawn from a seeded generator, so the same call on the same machine trains the
    same model.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < steps and (deadline is None or time.perf_counter() < deadline):
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
        if callback is not None:
            callback(step, loss.item())
    model.eval()
    return step


# --------------------------------------------------------------------------- the world, cached


@dataclass(frozen=True)
class ModelRecipe:
    """How one model of the world is made: an architecture, an initialisation and SFT steps.

    The same-architecture pair is one recipe trained once: the teacher is its final weights and the
    student its checkpoint at `student_steps`. Cross-architecture or cross-initialisation teachers
    are further recipes of their own (other sizes, another `init_seed`).
    """

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    init_seed: int = 0
    steps: int = 500


@dataclass(frozen=True)
class WorldSettings:
    seed: int = 0
    train_problems: int = 4000
    test_problems: int = 200
    min_ops: int = 4
    max_ops: int = 7
    vocab_size: int = 300
    model: ModelRecipe = field(default_factory=ModelRecipe)
    # The student is the teacher's own checkpoint at this SFT step: just before the steep part of the learning
    # curve, so teacher and student are a short walk apart in weight space with a wide accuracy gap, as the
    # paper's RL-trained teacher is from its student.
    student_steps: int = 250
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50

    def key(self) -> str:
        text = json.dumps({"version": TOY_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


QUICK_WORLD = WorldSettings(
    train_problems=1000, test_problems=64,
    model=ModelRecipe(hidden_size=32, num_layers=2, intermediate_size=64, steps=60),
    student_steps=20,
)


@dataclass
class World:
    root: Path
    settings: WorldSettings
    info: dict

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

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
    def test_path(self) -> Path:
        return self.root / "test.parquet"


def train_model(recipe: ModelRecipe, settings: WorldSettings, tokenizer, examples,
                on_step: Callable[[int, torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """A Qwen3 model of `recipe`'s shape, initialised from `recipe.init_seed`, after `recipe.steps` of SFT."""
    config = tiny_config(
        len(tokenizer), hidden_size=recipe.hidden_size, num_layers=recipe.num_layers, num_heads=recipe.num_heads,
        num_kv_heads=recipe.num_kv_heads, intermediate_size=recipe.intermediate_size,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.init_seed)
        model = AutoModelForCausalLM.from_config(config)
    callback = (lambda step, loss: on_step(step, model)) if on_step else None
    sft(model, examples, steps=recipe.steps, batch_size=settings.batch_size, lr=settings.lr,
        pad_id=tokenizer.pad_token_id, seed=settings.seed, warmup=settings.warmup, callback=callback)
    return model


# The bridge demo's teachers, each paired with the world's student (4 x 64, BPE, init seed 0). Each
# trains twice as long as the world's teacher: at 500 steps the 6 x 96 teacher was still below the
# student, and a teacher must be clearly the stronger model for distillation to mean anything.
BRIDGE_TEACHERS = {
    # deeper and wider: OPD still applies (same tokenizer), OPRD-Vanilla cannot (other width)
    "cross_arch": (ModelRecipe(hidden_size=96, num_layers=6, intermediate_size=384, steps=1000), "bpe"),
    # the student's architecture from another random initialisation: no shared representation
    "cross_init": (ModelRecipe(init_seed=1, steps=1000), "bpe"),
    # a character-level tokenizer: no OPD, positions matched by character offsets
    "cross_tokenizer": (ModelRecipe(init_seed=2, steps=1000), "char"),
}


def build_teacher(world: World, name: str, recipe: ModelRecipe | None = None, tokenizer_kind: str | None = None,
                  progress=None) -> Path:
    """A bridge-demo teacher of the world (`BRIDGE_TEACHERS[name]` unless given), built once and cached
    beside the world; returns its folder (model and tokenizer)."""
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
    train = train_split(world.settings)

    def fill(tmp: Path) -> None:
        if tokenizer_kind == "char":
            tokenizer = train_char_tokenizer([p.prompt + "\n" + p.solution for p in train], tmp)
        else:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(world.tokenizer))
        examples = sft_examples(tokenizer, [(p.prompt, p.solution) for p in train])
        task = progress.add_task(f"toy world: SFT {name} teacher", total=recipe.steps) if progress else None
        on_step = (lambda step, model: progress.update(task, completed=step)) if progress else None
        train_model(recipe, world.settings, tokenizer, examples, on_step).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_dir_atomically(root, fill)  # an interrupted build never leaves a half-written teacher


def cache_root() -> Path:
    """$OPRD_CACHE_DIR, else $XDG_CACHE_HOME/oprd, else ~/.cache/oprd."""
    if os.environ.get("OPRD_CACHE_DIR"):
        return Path(os.environ["OPRD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oprd"


def train_split(settings: WorldSettings) -> list[ToyProblem]:
    return make_split(settings.train_problems, settings.seed * 2 + 1, min_steps=settings.min_ops,
                      max_steps=settings.max_ops)


def build_world(settings: WorldSettings = WorldSettings(), progress=None) -> World:
    """The toy world for `settings`, from the cache or built (deterministically) and cached.

    Built in a temporary folder and renamed into place, so an interrupted build never leaves a
    half-written world behind. `progress` (a rich Progress) shows the SFT steps.
    """
    root = cache_root() / f"toy-{settings.key()}"
    if (root / "world.json").is_file():
        return World(root, settings, json.loads((root / "world.json").read_text()))
    started = time.perf_counter()
    train = train_split(settings)
    test = make_split(settings.test_problems, settings.seed * 2 + 2, exclude={p.prompt for p in train},
                      min_steps=settings.min_ops, max_steps=settings.max_ops)
    info = {
        "settings": dataclasses.asdict(settings),
        "version": TOY_VERSION,
        "example": {"prompt": test[0].prompt, "solution": test[0].solution, "answer": test[0].answer},
    }

    def fill(tmp: Path) -> None:
        write_problems(train, tmp / "train.parquet")
        write_problems(test, tmp / "test.parquet")
        tokenizer = train_tokenizer(
            (p.prompt + "\n" + p.solution for p in train), settings.vocab_size, tmp / "tokenizer", split_digits=True
        )
        examples = sft_examples(tokenizer, [(p.prompt, p.solution) for p in train])
        task = progress.add_task("toy world: SFT teacher", total=settings.model.steps) if progress else None

        def on_step(step: int, model: torch.nn.Module) -> None:
            if step == settings.student_steps:
                save_model_dir(tmp / "student", model, tokenizer)  # the teacher's own earlier checkpoint
            if progress:
                progress.update(task, completed=step)

        model = train_model(settings.model, settings, tokenizer, examples, on_step)
        save_model_dir(tmp / "teacher", model, tokenizer)
        info["build_seconds"] = time.perf_counter() - started
        (tmp / "world.json").write_text(json.dumps(info, indent=2))

    write_dir_atomically(root, fill)  # an interrupted build never leaves a half-written world
    return World(root, settings, info)
