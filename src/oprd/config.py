"""The `oprd train` config: flat typed dataclasses, one level of nesting, YAML plus overrides.

    cfg = load_config("recipes/paper/oprd.yaml", ["optim.lr=2e-5", "max_steps=100"])

Everything is checked here, before any model is loaded: unknown keys, wrong types, values out of
range and impossible combinations fail with a `ConfigError` that names the field and the fix.
`preflight.check_model_pairing` then reads only the two models' configs and tokenizers.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from oprd.gates import GateError, parse_gate
from oprd.losses import Aggregation, LayerMode, PositionMode, TopkSupport
from oprd.models import DTYPES, ModelSpec, device_problem

OPDObjective = Literal["none", "sampled", "topk", "full"]
SELF = "self"  # teacher.model=self: the student teaches itself (self-distillation)
SelfMode = Literal["frozen", "ema", "live"]
TEACHER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # it becomes part of metric keys


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


@dataclass
class DataConfig:
    path: str = ""  # parquet / JSONL file, shipped benchmark name, or hub dataset id
    split: str = "train"
    prompt_key: str | None = None  # auto-detected: verl `prompt` messages, or problem/question/prompt text
    answer_key: str | None = None
    use_chat_template: bool = True
    max_prompt_tokens: int = 1024  # longer prompts are reported and left out
    limit: int | None = None  # use only the first N rows
    shuffle: bool = True  # each pass over the prompts in a seeded shuffle; false: in file order
    enable_thinking: bool | None = None  # handed to the chat template when set (Qwen3: false = no thinking)


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    responses_per_prompt: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    backend: Literal["hf", "vllm"] = "hf"  # transformers' generate, or vLLM
    max_batch_sequences: int = 64  # sequences per generate() call at most (hf)
    kv_cache_gib: float = 0.0  # KV cache one generate() call may hold (hf); 0 = a quarter of the device's memory
    vllm_mode: Literal["server", "colocate"] = "server"  # a separately started `vllm serve`, or vllm.LLM on the GPU
    vllm_url: str = "http://127.0.0.1:8000"  # the server (vllm_mode=server)
    vllm_sync: Literal["auto", "nccl", "disk"] = "auto"  # how weights reach a server; auto: nccl on a GPU
    vllm_gpu_memory_utilization: float = 0.3  # the colocated engine's share of the GPU
    vllm_timeout_s: float = 600.0  # one HTTP request to the server
    # 0: every batch sampled by the weights it trains (on-policy). 1: a vLLM server samples the next
    # step's batch while this step trains, with the weights one update older (docs/vllm.md)
    max_weight_lag: Literal[0, 1] = 0


@dataclass
class OPDConfig:
    objective: OPDObjective = "none"
    k: int = 16  # top-k support size
    support: TopkSupport = "student"  # whose top-k the KL is taken over
    chunk_size: int = 0  # positions per LM-head chunk; 0 = auto: about 2^22 logits a chunk on a CPU, 2^26 on a GPU
    start_step: int = 0  # OPD applies from step start_step + 1 on (two-stage recipes: bridge, then OPD)
    # sampled-token OPD on a batch sampled by older weights (rollout.max_weight_lag=1): each token's
    # gradient weighted by the current student's probability over the sampler's, truncated at this cap
    is_ratio_cap: float = 2.0


@dataclass
class OPRDConfig:
    coef: float = 0.0  # mu in L = L_OPD + mu * L_OPRD; 0 turns OPRD off
    normalize: bool = True  # L2-normalise both vectors (reference code); false = paper's 1/d MSE
    layers: LayerMode | list[int] = "all"  # or explicit 1-based student layers
    positions: PositionMode = "last_k"
    k: int = 2000
    aggregation: Aggregation = "token"  # token (reference code) or sequence (paper Eq. 6)
    stop_step: int = 0  # OPRD applies up to this step; 0 = every step
    preflight_prompts: int = 4  # rollouts of this many prompts measure student-teacher cosine before training; 0 = skip
    preflight_min_cos: float = 0.5  # warn when the pre-flight cosine similarity is below this


@dataclass
class OptimConfig:
    lr: float = 1e-5
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up
    schedule_steps: int | None = None  # the steps warm-up and decay are spread over; None = max_steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    micro_batch_size: int = 4  # sequences per forward/backward; gradients accumulate over the step
    # when set, micro-batches are made by token count instead of micro_batch_size: each holds whole
    # sequences up to this many token slots, padding included (`RolloutBatch.token_budget_groups`)
    micro_batch_tokens: int | None = None
    # each micro-batch's sequences fed as one row without padding, attention kept within each
    # (`RolloutBatch.packed_rows`); with micro_batch_tokens the budget then counts real tokens
    pack_sequences: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on a CPU
    gradient_checkpointing: bool = False


@dataclass
class BridgeConfig:
    path: str | None = None  # OPRD-Bridge file (oprd.bridge.save_bridge): OPRD through frozen projectors


@dataclass
class TeacherSpec(ModelSpec):
    """`teacher.*`: where the teacher comes from (a hub id or path, or `self`) and what it reads."""

    self_mode: SelfMode = "frozen"  # model=self: the student at step 0, its moving average, or itself
    ema_decay: float = 0.99  # self_mode=ema: teacher <- decay * teacher + (1 - decay) * student after each step
    prompt_template: str | None = None  # the teacher's privileged prompt: "{prompt}" and data columns, e.g. "{answer}"


@dataclass
class TeacherMember(ModelSpec):
    """One entry of `teachers.members`: a model, its bridge, its weight and the samples it scores."""

    name: str = ""  # names its metrics: teachers/NAME/share, rep/cosine_similarity/teacher_NAME
    bridge: str | None = None  # its OPRD-Bridge file, when its width or depth differs from the student's
    weight: float = 1.0  # teachers.route_by unset: its weight in the average of all teachers' losses
    routes: list[str] = field(default_factory=list)  # values of the route_by column it scores; default [name]


@dataclass
class TeachersConfig:
    """Several teachers in one student (`teacher.*` and `bridge.path` describe a single one)."""

    route_by: str | None = None  # a data column (e.g. data_source): each sample goes to the teacher it names;
    # unset: every teacher scores every sample and the loss is the weighted average of theirs
    members: list[TeacherMember] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Validation during training: the benchmarks' val splits, sampled as `oprd eval` samples them."""
    every: int = 0  # every N steps and at the last; 0: no validation during training
    benchmarks: list[str] = field(default_factory=lambda: ["aime24"])
    samples: int = 4  # responses per problem (Avg@k, Best@k)
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 1024
    limit: int | None = None  # only the first N problems of each benchmark


# The flat keys the `eval` section replaced: a recipe that still uses one is told its new name, and a
# run folder written before the section is read with them moved into it (so it resumes).
RENAMED_KEYS = {f"eval_{name}": f"eval.{name}" for name in
                ("every", "benchmarks", "samples", "temperature", "top_p", "max_new_tokens", "limit")}


@dataclass
class TrainConfig:
    output_dir: str = "runs/oprd"
    seed: int = 0
    max_steps: int = 500
    save_every: int = 50  # 0: only the final model
    keep_checkpoints: int = 2
    resume: bool = False
    resume_from: str | None = None  # a checkpoint folder to resume from (default: the run's newest)
    resume_changes: list[str] = field(default_factory=list)  # keys allowed to differ from the resumed run's
    overwrite: bool = False
    device: str = "auto"
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb
    gates: list[str] = field(default_factory=list)  # "val/B/M >= N", ">= start + N", ">= teacher - N" (oprd.gates)
    keep_best: str | None = None  # a validation metric: best/ keeps the checkpoint with its best value
    keep_best_mode: Literal["max", "min"] = "max"
    # final/ and best/: auto = student.dtype where set, else the student checkpoint's own (config.json), else float32
    export_dtype: str = "auto"
    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    oprd: OPRDConfig = field(default_factory=OPRDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def uses_opd(self) -> bool:
        return self.opd.objective != "none"

    @property
    def uses_oprd(self) -> bool:
        return self.oprd.coef > 0


# --------------------------------------------------------------------------- the run's teachers


SINGLE = "teacher"  # the name of a run's one teacher (`teacher.*`)


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher comes from and what it is given; `field` names it in error messages."""

    name: str
    spec: ModelSpec  # the student's own for self-distillation
    field: str  # teacher | teachers.members[i]
    bridge: str | None = None
    weight: float = 1.0
    routes: tuple[str, ...] = ()
    self_mode: str | None = None  # frozen | ema | live for self-distillation; None: a model of its own
    shard: bool = True


def teacher_sources(cfg: TrainConfig) -> list[TeacherSource]:
    """`teachers.members` in order, or `teacher.*` as a list of one."""
    if cfg.teachers.members:
        return [TeacherSource(m.name, _model_spec(m), f"teachers.members[{i}]", m.bridge, m.weight,
                              tuple(m.routes or [m.name]), shard=m.shard)
                for i, m in enumerate(cfg.teachers.members)]
    if cfg.teacher.model == SELF:
        return [TeacherSource(SELF, cfg.student, "teacher", self_mode=cfg.teacher.self_mode, shard=cfg.teacher.shard)]
    return [TeacherSource(SINGLE, _model_spec(cfg.teacher), "teacher", cfg.bridge.path, shard=cfg.teacher.shard)]


def _model_spec(spec: ModelSpec) -> ModelSpec:
    """The ModelSpec part of a teacher's config section."""
    return ModelSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(ModelSpec)})


# --------------------------------------------------------------------------- building


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Reads a YAML recipe (or none), applies `key=value` / `section.key=value` overrides, validates.

    Relative model, tokenizer and data paths in a recipe are read from the recipe's folder when
    they exist there, so recipes work from any working directory.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"recipe {_yaml_error(path, error)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path} must be a mapping of keys to values")
        _resolve_recipe_paths(raw, path.parent)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-5)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it or fix it, "
                              "e.g. optim.lr=1e-5 or oprd.layers=[1,2]") from None
        _set_dotted(raw, key.strip(), parsed)
    for key in RENAMED_KEYS.keys() & raw.keys():
        section, name = RENAMED_KEYS[key].split(".")
        raise ConfigError(f"{key} is now {RENAMED_KEYS[key]}: write {RENAMED_KEYS[key]}={raw[key]!r} on the command "
                          f"line, or in a recipe `{section}:` with `{name}: {raw[key]!r}` under it")
    cfg = _build(TrainConfig, raw, prefix="")
    validate(cfg)
    return cfg


def _yaml_error(path: Path, error: yaml.YAMLError) -> str:
    """`path:line:column: problem` of a YAML syntax error (1-based, as editors count)."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or "not valid YAML"
    context = getattr(error, "context", None)
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def read_run_config(path: Path) -> TrainConfig:
    """The config a run recorded (its config.yaml), as it was: no path resolution, no validation
    (its models or bridge file may since have moved)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"the run's {_yaml_error(path, error)}") from None
    for key in RENAMED_KEYS.keys() & raw.keys():  # a run written before the key moved into its section
        section, name = RENAMED_KEYS[key].split(".")
        raw.setdefault(section, {})[name] = raw.pop(key)
    return _build(TrainConfig, raw, prefix="")


# Keys that leave what is trained unchanged (where output goes, how often to save or evaluate, how
# much memory a step uses): a resumed run may change them freely. Any other difference from the
# run's recorded config needs `resume_changes`.
FREE_ON_RESUME = frozenset({
    "output_dir", "resume", "resume_from", "resume_changes", "overwrite", "device", "report_to", "save_every",
    "keep_checkpoints", *(f"eval.{name}" for name in EvalConfig.__dataclass_fields__),
    "optim.micro_batch_size", "optim.micro_batch_tokens", "optim.pack_sequences", "optim.gradient_checkpointing",
    "rollout.max_batch_sequences", "rollout.kv_cache_gib",
    "oprd.preflight_prompts", "oprd.preflight_min_cos", "student.attn_implementation", "teacher.attn_implementation",
    "student.trust_remote_code", "teacher.trust_remote_code", "teacher.shard", "rollout.backend",
    "rollout.vllm_mode", "rollout.vllm_url", "rollout.vllm_sync", "rollout.vllm_gpu_memory_utilization",
    "rollout.vllm_timeout_s", "gates", "keep_best", "keep_best_mode", "export_dtype",
})


def flat_keys(cfg: TrainConfig) -> dict[str, Any]:
    """{"optim.lr": 1e-5, "seed": 0, ...}: every key as it is written on the command line."""
    flat = {}
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def trained_differences(run: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (run's value, new value)} for every key outside FREE_ON_RESUME that differs."""
    old_keys, new_keys = flat_keys(run), flat_keys(new)
    return {key: (old_keys[key], new_keys[key]) for key in new_keys
            if key not in FREE_ON_RESUME and old_keys.get(key) != new_keys[key]}


def _resolve_recipe_paths(raw: dict, folder: Path) -> None:
    def resolve(mapping: Any, key: str) -> None:
        value = mapping.get(key) if isinstance(mapping, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
            mapping[key] = str((folder / value).resolve())

    for section, key in (("student", "model"), ("student", "tokenizer"), ("teacher", "model"),
                         ("teacher", "tokenizer"), ("data", "path"), ("bridge", "path")):
        resolve(raw.get(section), key)
    members = raw.get("teachers", {}).get("members") if isinstance(raw.get("teachers"), dict) else None
    for member in members if isinstance(members, list) else []:
        for key in ("model", "tokenizer", "bridge"):
            resolve(member, key)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) > 2:
        raise ConfigError(f"override key {key!r} is nested too deeply: keys are `name` or `section.name`")
    target = raw
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    target[parts[-1]] = value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name in fields:
        if name not in raw:
            continue
        hint = hints[name]
        item_type = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name] or {}, prefix=f"{prefix}{name}.")
        elif dataclasses.is_dataclass(item_type):  # a list of sections: teachers.members
            items = raw[name] if raw[name] is not None else []
            require(isinstance(items, list), f"{prefix}{name} must be a list of mappings, got {items!r}")
            values[name] = [_build(item_type, item, prefix=f"{prefix}{name}[{i}].") for i, item in enumerate(items)]
        else:
            values[name] = _coerce(raw[name], hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Checks `value` against a field's type; only ints and numeric strings pass as floats."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else (hint,)
    choices = [choice for option in options if typing.get_origin(option) is Literal
               for choice in typing.get_args(option)]
    for option in options:
        if option is type(None) and value is None:
            return None
        if typing.get_origin(option) is Literal and value in typing.get_args(option):
            return value
        if option is float and (isinstance(value, (int, float)) and not isinstance(value, bool)
                                or isinstance(value, str) and _is_number(value)):  # YAML reads 1e-5 as a string
            if not math.isfinite(float(value)):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool) and isinstance(value, option):
            return value
        if typing.get_origin(option) is list and isinstance(value, list):
            (item_type,) = typing.get_args(option)
            if all(isinstance(v, item_type) and not isinstance(v, bool) for v in value):
                return list(value)
        if option == list[str] and isinstance(value, str):  # "a,b" on the command line
            return [v.strip() for v in value.split(",") if v.strip()]
    others = [str(o) if typing.get_origin(o) else o.__name__ for o in options if typing.get_origin(o) is not Literal]
    if choices:
        also = f" (or {' or '.join(others)})" if others else ""
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}{also}; got {value!r}")
    raise ConfigError(f"{name} must be {' or '.join(others)}, got {value!r} ({type(value).__name__})")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- validation


def require(condition: bool, message: str) -> None:
    """Raises ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def _one_of(value: Any, choices: tuple, name: str) -> None:
    require(value in choices, f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def validate_objective(opd: OPDConfig, oprd: OPRDConfig) -> None:
    """Checks the `opd.*` and `oprd.*` sections on their own (what `objective.LossPlan` reads)."""
    require(oprd.coef >= 0, f"oprd.coef (mu, the weight of OPRD) must be >= 0 (0 turns OPRD off); got {oprd.coef}")
    require(opd.objective != "none" or oprd.coef > 0,
            "nothing to train: set opd.objective (sampled|topk|full) and/or oprd.coef > 0")
    require(opd.k >= 1, f"opd.k must be >= 1; got {opd.k}")
    require(opd.chunk_size >= 0, f"opd.chunk_size must be >= 0 (0 = auto); got {opd.chunk_size}")
    require(opd.is_ratio_cap >= 1, f"opd.is_ratio_cap must be >= 1 (the largest importance weight); got "
                                   f"{opd.is_ratio_cap}")
    if not isinstance(oprd.layers, str):
        require(bool(oprd.layers) and all(layer >= 1 for layer in oprd.layers),
                f"oprd.layers as a list needs 1-based layer numbers (>= 1); got {oprd.layers}")
    require(oprd.k >= 1, f"oprd.k must be >= 1; got {oprd.k}")


def _check_choices(section: Any, prefix: str = "") -> None:
    """Every field typed as a `Literal` holds one of its choices, as `load_config` checks it: a
    config built in code (`dataclasses.replace`) is held to the same rule, with the same message."""
    for name, hint in typing.get_type_hints(type(section)).items():
        value = getattr(section, name)
        if dataclasses.is_dataclass(hint):
            _check_choices(value, f"{prefix}{name}.")
        elif Literal in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint))):
            _coerce(value, hint, f"{prefix}{name}")


def validate(cfg: TrainConfig) -> None:
    """Value and combination checks that need no model, section by section."""
    _check_choices(cfg)
    validate_run(cfg)
    validate_models(cfg)
    require(bool(cfg.data.path), "data.path is required (a parquet/JSONL file, benchmark name or hub dataset)")
    validate_data(cfg.data)
    validate_rollout(cfg.rollout)
    validate_objective(cfg.opd, cfg.oprd)
    validate_stages(cfg)
    validate_optim(cfg)
    if cfg.bridge.path is not None:
        _check_bridge(cfg, cfg.bridge.path, "bridge.path")
    validate_eval(cfg.eval)
    validate_gates(cfg)


def validate_run(cfg: TrainConfig) -> None:
    """The top-level keys: the device, the steps, saving, resuming, where metrics go."""
    problem = device_problem(cfg.device)
    require(problem is None, problem or "")
    require(cfg.max_steps >= 1, f"max_steps must be >= 1; got {cfg.max_steps}")
    require(cfg.save_every >= 0, "save_every must be >= 0 (0 saves only the final model)")
    require(cfg.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    require(cfg.resume_from is None or Path(cfg.resume_from).is_dir(),
            f"resume_from={cfg.resume_from}: no such checkpoint folder")
    unknown = [key for key in cfg.resume_changes if key not in flat_keys(cfg)]
    require(not unknown, f"resume_changes names keys that do not exist: {unknown}")
    _one_of(cfg.export_dtype, ("auto", *DTYPES), "export_dtype")
    for sink in cfg.report_to:
        _one_of(sink, ("tensorboard", "wandb"), "report_to entries")
        require(importlib.util.find_spec(sink) is not None,
                f"report_to={sink} needs the {sink} package: pip install 'oprd[{sink}]'")


def validate_models(cfg: TrainConfig) -> None:
    """`student.*`, then the teacher or teachers."""
    require(bool(cfg.student.model), "student.model is required (a hub id or a local path)")
    require(cfg.student.shard, "student.shard=false is not supported: the student is always sharded under torchrun "
                               "(teacher.shard=false keeps a full teacher in every process)")
    validate_teachers(cfg)
    for side, spec in (("student", cfg.student), ("teacher", cfg.teacher),
                       *((f"teachers.members[{i}]", m) for i, m in enumerate(cfg.teachers.members))):
        _one_of(spec.dtype, ("auto", *DTYPES), f"{side}.dtype")


def validate_data(data: DataConfig) -> None:
    require(data.max_prompt_tokens >= 1, "data.max_prompt_tokens must be >= 1")
    require(data.limit is None or data.limit >= 1, f"data.limit must be >= 1 (or unset); got {data.limit}")
    require(data.enable_thinking is None or data.use_chat_template,
            f"data.enable_thinking={data.enable_thinking} is a chat-template variable, but "
            "data.use_chat_template=false: drop one of them")


def validate_rollout(rollout: RolloutConfig) -> None:
    for name in ("prompts_per_step", "responses_per_prompt", "max_new_tokens", "max_batch_sequences"):
        require(getattr(rollout, name) >= 1, f"rollout.{name} must be >= 1")
    require(rollout.temperature > 0, "rollout.temperature must be > 0: on-policy distillation samples")
    require(0 < rollout.top_p <= 1, f"rollout.top_p must be in (0, 1]; got {rollout.top_p}")
    require(rollout.kv_cache_gib >= 0,
            f"rollout.kv_cache_gib must be >= 0 (0 = a quarter of the device's memory); got {rollout.kv_cache_gib}")
    require(0 < rollout.vllm_gpu_memory_utilization < 1,
            f"rollout.vllm_gpu_memory_utilization must be in (0, 1); got {rollout.vllm_gpu_memory_utilization}")
    require(rollout.vllm_timeout_s > 0, "rollout.vllm_timeout_s must be > 0")
    require(rollout.max_weight_lag == 0 or rollout.backend == "vllm" and rollout.vllm_mode == "server",
            "rollout.max_weight_lag=1 samples the next batch while this one trains, which needs a sampler with "
            "devices of its own: set rollout.backend=vllm rollout.vllm_mode=server. With transformers' generate or "
            "a colocated vLLM engine, sampling and training take turns on the same device and there is nothing "
            "to overlap")
    require(rollout.backend != "vllm" or rollout.vllm_mode != "colocate"
            or importlib.util.find_spec("vllm") is not None,
            "rollout.backend=vllm with vllm_mode=colocate needs vLLM in this environment: pip install -e '.[vllm]' "
            "(or vllm_mode=server with a separately started server)")


def validate_stages(cfg: TrainConfig) -> None:
    """opd.start_step and oprd.stop_step: every step has an objective."""
    require(cfg.opd.start_step >= 0 and cfg.oprd.stop_step >= 0, "opd.start_step and oprd.stop_step must be >= 0")
    require(not cfg.uses_opd or cfg.opd.start_step < cfg.max_steps,
            f"opd.start_step={cfg.opd.start_step} leaves no step for OPD (max_steps={cfg.max_steps})")
    require(cfg.oprd.stop_step == 0 or cfg.uses_oprd, "oprd.stop_step is set but OPRD is off (oprd.coef=0)")
    oprd_last = (cfg.oprd.stop_step or cfg.max_steps) if cfg.uses_oprd else 0
    opd_first = cfg.opd.start_step + 1 if cfg.uses_opd else cfg.max_steps + 1
    require(oprd_last + 1 >= min(opd_first, cfg.max_steps + 1),
            f"steps {oprd_last + 1}..{min(opd_first, cfg.max_steps + 1) - 1} have no objective: OPRD stops after "
            f"oprd.stop_step={cfg.oprd.stop_step} and OPD starts after opd.start_step={cfg.opd.start_step}")
    require(cfg.oprd.preflight_prompts >= 0, "oprd.preflight_prompts must be >= 0 (0 skips the check)")


def validate_optim(cfg: TrainConfig) -> None:
    optim = cfg.optim
    require(optim.lr > 0, f"optim.lr must be > 0; got {optim.lr}")
    require(0 <= optim.warmup_ratio < 1, f"optim.warmup_ratio must be in [0, 1); got {optim.warmup_ratio}")
    require(0 <= optim.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1]; got {optim.min_lr_ratio}")
    horizon = optim.schedule_steps
    require(horizon is None or horizon >= 1, f"optim.schedule_steps must be >= 1 (or unset: max_steps); got {horizon}")
    decays_to_zero = optim.schedule != "constant" and optim.min_lr_ratio == 0
    require(horizon is None or horizon >= cfg.max_steps or not decays_to_zero,
            f"optim.schedule_steps={horizon} is below max_steps={cfg.max_steps}: the {optim.schedule} decay "
            f"reaches lr 0 there and steps {(horizon or 0) + 1}..{cfg.max_steps} would not train; set "
            "schedule_steps >= max_steps (or leave it unset), or optim.min_lr_ratio > 0")
    require(optim.micro_batch_size >= 1, "optim.micro_batch_size must be >= 1")
    require(optim.micro_batch_tokens is None or optim.micro_batch_tokens >= 1,
            f"optim.micro_batch_tokens must be >= 1 (or unset: micro_batch_size sequences a micro-batch); got "
            f"{optim.micro_batch_tokens}")
    require(optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
    for name in ("beta1", "beta2"):
        value = getattr(optim, name)
        require(0 <= value < 1, f"optim.{name} must be in [0, 1); got {value}")
    require(optim.eps > 0, f"optim.eps must be > 0; got {optim.eps}")
    require(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {optim.weight_decay}")


def _check_bridge(cfg: TrainConfig, path: str, name: str) -> None:
    """A bridge file (`bridge.path`, or a member's): OPRD on, normalised states, the file there."""
    require(cfg.uses_oprd, f"{name} is set but OPRD is off: set oprd.coef > 0 to use the bridge")
    require(cfg.oprd.normalize, f"{name} compares L2-normalised projections (the paper's Stage 2), so "
                                "oprd.normalize=false does not apply: drop it or set oprd.normalize=true")
    require(Path(path).is_file(), f"{name}={path}: no such file (fit one with `oprd bridge fit`)")


def validate_eval(evaluation: EvalConfig) -> None:
    require(evaluation.every >= 0, f"eval.every must be >= 0 (0: no validation); got {evaluation.every}")
    require(bool(evaluation.benchmarks) or evaluation.every == 0,
            "eval.benchmarks is empty but eval.every > 0: name a benchmark (e.g. eval.benchmarks=[aime24])")
    require(evaluation.samples >= 1, f"eval.samples must be >= 1; got {evaluation.samples}")
    require(evaluation.temperature >= 0, f"eval.temperature must be >= 0; got {evaluation.temperature}")
    require(0 < evaluation.top_p <= 1, f"eval.top_p must be in (0, 1]; got {evaluation.top_p}")
    require(evaluation.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1; got {evaluation.max_new_tokens}")
    require(evaluation.limit is None or evaluation.limit >= 1, f"eval.limit must be >= 1 (or unset); got "
                                                                f"{evaluation.limit}")


def validate_teachers(cfg: TrainConfig) -> None:
    """One teacher (`teacher.*`, possibly `self`) or several (`teachers.members`), never both."""
    teacher, members = cfg.teacher, cfg.teachers.members
    if not members:
        require(bool(teacher.model), "teacher.model is required (a hub id, a local path, or self for "
                                     "self-distillation), or list several teachers in teachers.members")
        require(cfg.teachers.route_by is None, "teachers.route_by is set but teachers.members is empty: list the "
                                               "teachers to route between, or drop teachers.route_by")
    else:
        require(not teacher.model, f"teacher.model={teacher.model} and teachers.members are both set: a run has one "
                                   "teacher (teacher.*) or several (teachers.members), not both")
        require(cfg.bridge.path is None, "bridge.path is for a single teacher: with teachers.members give each "
                                         "member its own bridge (teachers.members[i].bridge)")
        require(teacher.prompt_template is None, "teacher.prompt_template applies to a single teacher; it cannot "
                                                 "be combined with teachers.members")
        names = [member.name for member in members]
        routes: dict[str, str] = {}
        for i, member in enumerate(members):
            field_name = f"teachers.members[{i}]"
            require(bool(TEACHER_NAME.match(member.name)),
                    f"{field_name}.name must be a non-empty name of letters, digits, '_', '.' or '-' (it names the "
                    f"teacher's metrics); got {member.name!r}")
            require(names.count(member.name) == 1, f"{field_name}.name={member.name!r} names two teachers")
            require(bool(member.model) and member.model != SELF,
                    f"{field_name}.model must be a hub id or a local path (self-distillation uses teacher.model=self)")
            require(member.weight > 0, f"{field_name}.weight must be > 0; got {member.weight}")
            require(cfg.teachers.route_by is None or member.weight == 1.0,
                    f"{field_name}.weight={member.weight}: weights apply to the weighted average (teachers.route_by "
                    "unset); a routed sample is scored by its one teacher")
            if member.bridge is not None:
                _check_bridge(cfg, member.bridge, f"{field_name}.bridge")
            for value in member.routes or [member.name]:
                require(value not in routes, f"{field_name}.routes: {cfg.teachers.route_by}={value!r} is routed to "
                                             f"both {routes.get(value)} and {member.name}")
                routes[value] = member.name
            require(not member.routes or cfg.teachers.route_by is not None,
                    f"{field_name}.routes is set but teachers.route_by is not: name the data column to route by")
    defaults = TeacherSpec()
    require(teacher.model == SELF or (teacher.self_mode, teacher.ema_decay) == (defaults.self_mode, defaults.ema_decay),
            "teacher.self_mode and teacher.ema_decay apply to teacher.model=self (self-distillation)")
    require(0 < teacher.ema_decay < 1, f"teacher.ema_decay must be in (0, 1); got {teacher.ema_decay}")
    if teacher.model == SELF:
        require(teacher.tokenizer is None and not teacher.random_init and teacher.revision is None,
                "teacher.model=self is the student itself: drop teacher.tokenizer, teacher.revision and "
                "teacher.random_init (the student's apply)")
        require(cfg.bridge.path is None, "teacher.model=self shares the student's width and depth: drop bridge.path")
        require(teacher.self_mode != "ema" or teacher.shard,
                "teacher.self_mode=ema keeps its average in the student's own shards: drop teacher.shard=false")
    if teacher.prompt_template is not None:
        fields = template_fields(teacher.prompt_template, "teacher.prompt_template")
        require(bool(fields), f"teacher.prompt_template={teacher.prompt_template!r} names no field: write {{prompt}} "
                              "for the student's prompt and data columns such as {answer} for the privileged context")


def template_fields(template: str, name: str) -> list[str]:
    """The `{field}` names of a prompt template, in order; a template str.format cannot read is an error."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ConfigError(f"{name}={template!r} is not a valid template ({error}); write literal braces as {{{{ }}}}") \
            from None
    fields = [field_name for _, field_name, _, _ in parsed if field_name is not None]
    require(all(fields), f"{name}={template!r} has an empty {{}}: name the field, e.g. {{prompt}} or {{answer}}")
    return fields


VALIDATION_METRICS = ("avg@{k}", "best@{k}", "dist-4g", "avg_len", "format_error_rate")  # per benchmark


def validation_keys(cfg: TrainConfig) -> list[str]:
    """The metric keys a run's validation reports: val/BENCHMARK/METRIC."""
    return [f"val/{Path(name).stem}/{metric.format(k=cfg.eval.samples)}"
            for name in cfg.eval.benchmarks for metric in VALIDATION_METRICS]


def validate_gates(cfg: TrainConfig) -> None:
    """`gates` and `keep_best` name metrics the run's validation reports, and the run validates."""
    if not cfg.gates and cfg.keep_best is None:
        return
    require(cfg.eval.every > 0, "gates and keep_best judge the run's validation, but eval.every=0 turns it off: set "
                                "eval.every=N (validation every N steps and at the last)")
    known = validation_keys(cfg)
    for text in cfg.gates:
        try:
            gate = parse_gate(text)
        except GateError as error:
            raise ConfigError(f"gates: {error}") from None
        require(gate.metric in known, f"gates: {text!r} names {gate.metric}, which validation does not report; "
                                      f"it reports {', '.join(known)}")
        require(gate.base != "teacher" or len(cfg.teachers.members) <= 1 and cfg.teacher.model != SELF,
                f"gates: {text!r} is relative to the teacher, but this run has "
                f"{'no teacher of its own (teacher.model=self)' if cfg.teacher.model == SELF else 'several'}: "
                "write an absolute threshold or one relative to start")
    require(cfg.keep_best is None or cfg.keep_best in known,
            f"keep_best={cfg.keep_best} is not a metric validation reports; it reports {', '.join(known)}")
