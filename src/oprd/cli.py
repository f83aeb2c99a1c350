"""The `oprd` command line: thin wrappers over the library.

    oprd train recipes/smoke/oprd.yaml max_steps=3 output_dir=runs/smoke
    oprd eval runs/smoke/final --benchmarks aime24 --samples 4
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def main() -> None:
    """On-policy distillation of language models: OPRD and the OPD baselines."""


@contextmanager
def user_errors(*kinds: type[BaseException]):
    """A user's mistake (a bad value, a missing file, an output folder in use) becomes one red line
    on stderr and exit code 2, instead of a traceback."""
    try:
        yield
    except (ValueError, FileExistsError, FileNotFoundError, *kinds) as error:
        Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), str(error)))
        raise typer.Exit(code=2) from error


def _vllm_url(backend: str, url: str | None) -> str | None:
    """The server --backend vllm samples through; None for hf."""
    if backend not in ("hf", "vllm"):
        raise ValueError(f"--backend must be hf or vllm, got {backend!r}")
    if backend == "vllm" and not url:
        raise ValueError("--backend vllm needs --vllm-url (a server started as docs/vllm.md shows)")
    return url if backend == "vllm" else None


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# the chat template's enable_thinking (data.prompt_token_ids), for `oprd eval` and `oprd bridge`
_THINKING_HELP = ("hand enable_thinking to the chat template (Qwen3's reads it; --disable-thinking: answers "
                  "without thinking) [default: not set]")


# --- train (core engine) ---


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/smoke/oprd.yaml"),
    overrides: list[str] = typer.Argument(None, help="key=value or section.key=value, e.g. optim.lr=2e-5"),
    nproc: int = typer.Option(1, "--nproc", min=1,
                              help="processes on this node, one per GPU (torchrun + FSDP2); 1: no process group"),
) -> None:
    """On-policy distillation from a YAML recipe plus overrides.

    Example: oprd train recipes/smoke/oprd.yaml output_dir=runs/smoke max_steps=3
    Several GPUs: oprd train recipes/paper/oprd.yaml --nproc 8   (or: torchrun --nproc-per-node 8 -m oprd train ...)
    """
    import sys

    if nproc > 1:  # the same command under torchrun, which starts one process per device
        import subprocess

        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "oprd", "train", str(recipe), *(overrides or [])]
        raise typer.Exit(code=subprocess.run(command).returncode)

    from oprd import distributed
    from oprd.config import load_config
    from oprd.files import DiskFullError
    from oprd.trainer import train as run_training

    with user_errors(FloatingPointError, DiskFullError):
        cfg = load_config(recipe, overrides or [])
        try:
            run_training(cfg)
        except KeyboardInterrupt:
            Console(stderr=True).print(Text(f"interrupted: every checkpoint in {cfg.output_dir} is whole; run the "
                                            "same command with resume=true to continue"))
            raise typer.Exit(code=130) from None
        finally:
            distributed.close()


# --- make-model ---


@app.command("make-model")
def make_model(
    shape: str = typer.Argument(..., help="qwen3-0.6b, qwen3-1.7b, qwen3-4b, r1-distill-1.5b, phi-4-mini, tiny"),
    out: Path = typer.Argument(..., help="the model folder to write (must not exist)"),
    tokenizer: Path = typer.Option(..., help="a tokenizer folder, copied beside the weights "
                                             "(e.g. ../shared/data/tokenizers/qwen3)"),
    seed: int = typer.Option(0, help="the random weights' seed"),
    layers: int = typer.Option(None, help="fewer blocks than the published depth (nothing else changes)"),
    dtype: str = typer.Option("bfloat16", help="the weights' dtype on disk (the published checkpoints' is bfloat16)"),
) -> None:
    """A random-weight model folder of a published model's shape, with a real tokenizer: it loads
    as the hub checkpoint's folder would (transformers, vLLM, `oprd train student.model=OUT`).

    Example: oprd make-model qwen3-0.6b runs/models/student --tokenizer ../shared/data/tokenizers/qwen3
    """
    from oprd.shapes import write_model_folder

    with user_errors(OSError):
        folder = write_model_folder(shape, out, tokenizer=tokenizer, seed=seed, num_layers=layers, dtype=dtype)
    Console().print(f"wrote {folder}")


# --- bench ---


@app.command()
def bench(
    preset: str = typer.Option("r1-distill-1.5b", help="a model shape of `oprd make-model`: r1-distill-1.5b, "
                                                        "qwen3-0.6b, qwen3-1.7b, qwen3-4b, phi-4-mini, tiny"),
    num_layers: int = typer.Option(None, help="truncate depth so a CPU can run it [default: 4 on CPU, full on GPU]"),
    seq_len: int = typer.Option(1024, help="response tokens per sequence"),
    seq_lens: str = typer.Option(None, help="comma-separated sweep, e.g. 512,1024,2048,4096"),
    batch_size: int = typer.Option(1),
    methods: str = typer.Option("opd_top1,opd_top16,opd_full,oprd,oprd_plus_opd,floor,trl"),
    repeats: int = typer.Option(3, help="timed updates per method after one warm-up"),
    device: str = typer.Option("auto", help="auto, cpu, cuda"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16"),
    autocast: bool = typer.Option(False, "--autocast", help="bf16 autocast over the weights: with --dtype float32, "
                                                             "how training runs with optim.precision=bf16"),
    out: Path = typer.Option(Path("runs/bench")),
    overwrite: bool = typer.Option(False, help="write into a non-empty --out"),
    splits: str = typer.Option(None, help="compare micro-batchings of one batch: comma-separated whole, size:N "
                                          "(optim.micro_batch_size), tokens:N (optim.micro_batch_tokens), "
                                          "packed:N (the same, optim.pack_sequences=true)"),
    min_len: int = typer.Option(None, help="mixed response lengths, spread from --min-len to --seq-len"),
    rollout: bool = typer.Option(False, "--rollout", help="measure sampling instead: tokens/s of transformers' "
                                                          "generate and of a vLLM server (--model, --vllm-url)"),
    model: str = typer.Option(None, help="--rollout: a local model folder"),
    vllm_url: str = typer.Option(None, help="--rollout: a vLLM server to measure beside transformers"),
    prompts: int = typer.Option(16, help="--rollout: prompts of aime24"),
    max_new_tokens: int = typer.Option(256, help="--rollout: new tokens per response at most"),
) -> None:
    """What one actor update costs under each loss: bench.json, bench.md, bench.png (--rollout:
    what sampling costs, rollout.json and rollout.md).

    Example: oprd bench --preset r1-distill-1.5b --num-layers 4 --seq-len 1024 --batch-size 1 --out runs/bench
    """
    from oprd.experiments.bench import BenchSettings, RolloutBenchSettings, run_bench, run_rollout_bench

    console = Console(stderr=True, soft_wrap=True)
    if rollout:
        with user_errors(RuntimeError, OSError):
            if not model:
                raise ValueError("--rollout needs --model (a local model folder)")
            settings = RolloutBenchSettings(out=out, model=model, vllm_url=vllm_url, prompts=prompts,
                                            max_new_tokens=max_new_tokens, device=device, overwrite=overwrite)
            with console.status("sampling") as status:
                run_rollout_bench(settings, progress=lambda text: status.update(f"sampling with {text}"))
        Console().print((out / "rollout.md").read_text())
        return
    with user_errors(RuntimeError):
        try:
            lengths = [int(v) for v in _csv(seq_lens)] if seq_lens else [seq_len]
        except ValueError:
            raise ValueError(f"--seq-lens must be comma-separated integers, got {seq_lens!r}") from None
        settings = BenchSettings(
            out=out, preset=preset, seq_lens=lengths,
            num_layers=num_layers, batch_size=batch_size, methods=_csv(methods), repeats=repeats, device=device,
            dtype=dtype, autocast=autocast, min_len=min_len, splits=_csv(splits) if splits else ["whole"],
            overwrite=overwrite,
        )
        with console.status("measuring") as status:
            result = run_bench(settings, progress=lambda text: status.update(f"measuring {text}"))
    if "splits" in result:
        Console().print((out / "splits.md").read_text())
        console.print(f"wrote {out / 'splits.json'}, {out / 'splits.md'} ({result['device']})")
        return
    Console().print((out / "bench.md").read_text())
    console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'} ({result['device']})")


# --- eval (evaluation harness) ---

class _EvalGroup(TyperGroup):
    """`oprd eval MODEL ...` runs `oprd eval run MODEL ...`; `oprd eval grade FILE` grades a file."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_EvalGroup,
    no_args_is_help=True,
    help="Evaluate models on math benchmarks (`oprd eval MODEL...`) or grade responses (`oprd eval grade FILE`).",
)
app.add_typer(eval_app, name="eval")


def _default_eval_dir() -> Path:
    return Path("evals") / datetime.now().strftime("%Y%m%d-%H%M%S")


@eval_app.command("run")
def eval_run(
    models: list[str] = typer.Argument(..., help="hub ids or local model dirs"),
    benchmarks: str = typer.Option(
        "aime24,aime25,aimo", help="comma-separated: aime24, aime25, aimo, amc23, math500 or data files"
    ),
    samples: int = typer.Option(16, help="responses per problem (the k of Avg@k)"),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(1.0),
    max_new_tokens: int = typer.Option(4096),
    out: Path = typer.Option(None, help="output dir [default: evals/<timestamp>]"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(64, help="sequences per generate call at most"),
    kv_cache_gib: float = typer.Option(0.0, help="KV cache a generate call may hold (0: a quarter of the device's)"),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code/--no-trust-remote-code"),
    chat_template: bool = typer.Option(
        True, "--chat-template/--no-chat-template", help="off: the user turns as plain text (base models)"
    ),
    enable_thinking: bool = typer.Option(None, "--enable-thinking/--disable-thinking", help=_THINKING_HELP),
    prompt_key: str = typer.Option(None, help="prompt column of benchmark files (dotted for nested)"),
    answer_key: str = typer.Option(None, help="answer column of benchmark files, e.g. reward_model.ground_truth"),
    limit: int = typer.Option(None, help="first N problems of each benchmark"),
    overwrite: bool = typer.Option(False, help="write into a non-empty --out"),
    backend: str = typer.Option("hf", help="hf (transformers' generate) or vllm (a running server, --vllm-url)"),
    vllm_url: str = typer.Option(None, help="the vLLM server (--backend vllm); it loads each model's weights in turn"),
) -> None:
    """Sample and grade models on math benchmarks; writes summary.json, samples.jsonl, results.md.

    Example: oprd eval runs/smoke/final Qwen/Qwen3-1.7B --benchmarks aime24,aime25,aimo --samples 16
    """
    from oprd.evaluation.harness import EvalSettings, run_eval
    from oprd.rollout import SamplingParams

    with user_errors(ImportError, OSError):
        settings = EvalSettings(
            models=models, benchmarks=_csv(benchmarks), out=out or _default_eval_dir(),
            sampling=SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=samples),
            seed=seed, batch_size=batch_size, kv_cache_gib=kv_cache_gib, dtype=dtype, device=device,
            trust_remote_code=trust_remote_code,
            use_chat_template=chat_template, enable_thinking=enable_thinking, prompt_key=prompt_key,
            answer_key=answer_key, limit=limit,
            overwrite=overwrite, vllm_url=_vllm_url(backend, vllm_url),
        )
        run_eval(settings, console=Console())


@eval_app.command("grade")
def eval_grade(
    responses: Path = typer.Argument(
        ..., help='JSONL: {"index": i, "responses": [...]} or {"index": i, "response": "..."} per line'
    ),
    data: str = typer.Option(..., help="the benchmark the indices refer to: a shipped name or a file"),
    out: Path = typer.Option(None, help="output dir [default: evals/<timestamp>]"),
    tokenizer: str = typer.Option(None, help="count lengths in this tokenizer's tokens (default: whitespace tokens)"),
    prompt_key: str = typer.Option(None),
    answer_key: str = typer.Option(None),
    overwrite: bool = typer.Option(False, help="write into a non-empty --out"),
) -> None:
    """Grade responses sampled elsewhere (e.g. by vLLM); writes the same report as `oprd eval`.

    Example: oprd eval grade responses.jsonl --data aime24 --out evals/vllm --tokenizer Qwen/Qwen3-1.7B
    """
    from oprd.evaluation.harness import GradeSettings, grade_responses_file

    with user_errors(ImportError, OSError):
        settings = GradeSettings(responses=responses, data=data, out=out or _default_eval_dir(), tokenizer=tokenizer,
                                 prompt_key=prompt_key, answer_key=answer_key, overwrite=overwrite)
        grade_responses_file(settings, console=Console())


# --- bridge ---

bridge_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="OPRD-Bridge Stage 1: fit frozen projectors between a student and a teacher.")
app.add_typer(bridge_app, name="bridge")


def _stage1_options(
    prompts: int = typer.Option(64, help="prompts (the first N of --data) the student answers"),
    responses_per_prompt: int = typer.Option(2),
    max_new_tokens: int = typer.Option(512),
    temperature: float = typer.Option(1.0),
    max_rows: int = typer.Option(16_384, help="hidden-state rows kept per layer pair (uniform sample; the paper's)"),
    layers: str = typer.Option("all", help="student layers: all, or e.g. 4,8,12"),
    epochs: int = typer.Option(20, help="passes of the student-projector fit (the paper's 20)"),
    lr: float = typer.Option(1e-2, help="Adam lr of the student-projector fit (cosine-decayed)"),
    holdout: float = typer.Option(0.1, help="share of rows held out of both fits, for the reported cosine"),
    normalize_states: bool = typer.Option(True, "--normalize-states/--raw-states",
                                          help="fit on unit-RMS states, as pre-norm blocks read them (raw: the paper)"),
    enable_thinking: bool = typer.Option(None, "--enable-thinking/--disable-thinking", help=_THINKING_HELP),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = typer.Option(False, help="run model code from the hub (off: safe default)"),
) -> dict:
    return dict(locals())


def _with_stage1_options(command):
    """Gives a bridge command the shared Stage 1 options (typer reads them from the signature)."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "options"]
    shared = list(inspect.signature(_stage1_options).parameters.values())

    def wrapped(**kwargs):
        options = {name: kwargs.pop(name) for name in [p.name for p in shared]}
        return command(**kwargs, options=options)

    wrapped.__signature__ = inspect.Signature(own + shared)
    wrapped.__annotations__ = {**_stage1_options.__annotations__, **command.__annotations__}
    wrapped.__doc__, wrapped.__name__ = command.__doc__, command.__name__
    return wrapped


@bridge_app.command("fit")
@_with_stage1_options
def bridge_fit(
    student: str = typer.Option(..., help="student model: hub id or local path"),
    teacher: str = typer.Option(..., help="teacher model: hub id or local path"),
    data: str = typer.Option(..., help="prompts: parquet/JSONL file, shipped benchmark name or hub dataset"),
    rank: int = typer.Option(8, help="bridge rank r (at most the smaller hidden size)"),
    out: Path = typer.Option(Path("bridge.safetensors"), help="the bridge file to write"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    options: dict | None = None,
) -> None:
    """Stage 1: rollouts, hidden-state rows, teacher PCA and a trained student projector -> one file.

    Example: oprd bridge fit --student S --teacher T --data prompts.parquet --rank 8 --out bridge.safetensors
    """
    from oprd.bridge import save_bridge
    from oprd.bridge.stage1 import Stage1Settings, fit_bridge_at_rank, stage1_rows
    from oprd.files import held_folder, refuse_existing_file

    console = Console(stderr=True, soft_wrap=True)
    with user_errors(), held_folder(out):
        refuse_existing_file(out, overwrite=overwrite, overwrite_flag="--overwrite")
        settings = Stage1Settings(student=student, teacher=teacher, data=data, **options)
        rows, info = stage1_rows(settings, console)
        bridge = fit_bridge_at_rank(rows, rank, settings, info)
        save_bridge(bridge, out)
    for layer in bridge.metadata["layers"]:
        console.print(f"layer {layer['student_layer']} <- teacher {layer['teacher_layer']}: held-out cosine "
                      f"{layer['cos_before']:.3f} before, {layer['cos_after']:.3f} after")
    console.print(f"mean held-out cosine {bridge.metadata['cos_after']:.3f}; bridge written to {out}")


@bridge_app.command("sweep")
@_with_stage1_options
def bridge_sweep(
    student: str = typer.Option(..., help="student model: hub id or local path"),
    teacher: str = typer.Option(..., help="teacher model: hub id or local path"),
    data: str = typer.Option(..., help="prompts: parquet/JSONL file, shipped benchmark name or hub dataset"),
    ranks: str = typer.Option("1,2,4,8,16,32,64", help="comma-separated ranks"),
    out: Path = typer.Option(Path("runs/bridge_sweep"), help="folder for sweep.json/md/png and one bridge per rank"),
    overwrite: bool = typer.Option(False, help="write into a non-empty --out"),
    options: dict | None = None,
) -> None:
    """The paper's rank study: one bridge per rank on the same rows; cosine before and after, table and plot.

    Example: oprd bridge sweep --student S --teacher T --data prompts.parquet --ranks 1,2,4,8,16,32,64 --out DIR
    """
    from oprd.bridge.stage1 import Stage1Settings, stage1_rows
    from oprd.experiments.bridge_sweep import sweep_ranks
    from oprd.files import held_folder, prepare_output_dir

    console = Console(stderr=True, soft_wrap=True)
    with user_errors(), held_folder(out):
        prepare_output_dir(out, overwrite=overwrite, overwrite_flag="--overwrite", ours=None)
        try:
            rank_list = [int(r) for r in _csv(ranks)]
        except ValueError:
            raise ValueError(f"--ranks must be comma-separated integers, got {ranks!r}") from None
        settings = Stage1Settings(student=student, teacher=teacher, data=data, **options)
        rows, info = stage1_rows(settings, console)
        table = sweep_ranks(rows, rank_list, settings, info, out)
    for row in table:
        console.print(f"rank {row['rank']:>3}: cosine {row['cos_before']:.3f} -> {row['cos_after']:.3f}")
    console.print(f"wrote {out / 'sweep.md'}, {out / 'sweep.png'}")


# --- runs: gates, reports, comparisons ---


@app.command()
def gate(run: Path = typer.Argument(..., help="a run folder (oprd train output_dir)")) -> None:
    """The run's evaluation gates at its last judged validation; exit 0 if all pass, 1 if any fails,
    2 if the run has no gates or no validation to judge: a step for a CI pipeline.

    Example: oprd gate runs/mine && echo ship it
    """
    from oprd.display import print_table
    from oprd.gates import verdict

    console = Console(soft_wrap=True)
    with user_errors():
        if not run.is_dir():
            raise FileNotFoundError(f"{run}: no such run folder")
        code, judged = verdict(run)
    if judged is None:
        console.print(f"{run}: no gates were judged (set gates=[...] and eval.every=N in the recipe)")
        raise typer.Exit(code=2)
    rows = [[r["gate"], "-" if r["value"] is None else f"{r['value']:.4g}", f"{r['threshold']:.4g}",
             "pass" if r["passed"] else "FAIL"] for r in judged["results"]]
    title = f"gates at step {judged['step']}{' (the end of the run)' if judged['final'] else ''}"
    print_table(console, title, ["gate", "value", "threshold", ""], rows)
    raise typer.Exit(code=code)


@app.command()
def report(run: Path = typer.Argument(..., help="a run folder (oprd train output_dir)")) -> None:
    """RUN/report.md and RUN/report/*.png: loss, representation cosine, KL estimate, response length,
    validation and cost against step; final and best validation; the run's segments and cost.

    Example: oprd report runs/mine
    """
    from oprd.runs.report import write_report

    with user_errors():
        written = write_report(run)
    Console().print(f"report: {written}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="two or more run folders"),
    out: Path = typer.Option(Path("runs/compare"), help="folder for compare.md and the overlaid plots"),
) -> None:
    """Runs side by side: the config keys that differ, final and best validation, cost, overlaid curves.

    Example: oprd compare runs/oprd runs/opd --out runs/compare
    """
    from oprd.runs.report import write_comparison

    with user_errors():
        written = write_comparison(runs, out)
    Console().print(f"comparison: {written}")


# --- demo ---


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder (results.json, report.md, plots, runs/)"),
    quick: bool = typer.Option(False, help="a reduced run (small world, few steps), for tests"),
    seed: int = typer.Option(0, help="the first seed"),
    seeds: int = typer.Option(1, help="seeds per method (seed .. seed + N - 1): mean and spread in the tables"),
    steps: int = typer.Option(None, help="optimizer steps per method [default: 150, quick: 4]"),
    oprd_k: int = typer.Option(None, help="OPRD last-k response positions [default: 64]"),
    tune: bool = typer.Option(False, "--tune", help="search every method's settings with the same budget on the "
                                                    "validation split first (writes tuned.json)"),
    tuned: Path = typer.Option(None, help="a tuned.json (from --tune) to use instead of the shipped one"),
    resume: bool = typer.Option(False, "--resume", help="with --tune: continue an interrupted search in --out, "
                                                        "reading back the runs it already measured"),
    threads: int = typer.Option(1, help="torch CPU threads for training and measuring (the toy world is always "
                                        "built on its own fixed count)"),
    theorem1: bool = typer.Option(False, "--theorem1", help="also measure Theorem 1 (each objective's gradient "
                                                            "noise) along the first seed's OPRD run: about a minute"),
    world_only: bool = typer.Option(False, "--world-only", help="load (or build) the toy world alone and write "
                                                                "OUT/world.json"),
    rebuild_world: bool = typer.Option(False, "--rebuild-world", help="build the toy world on this machine (minutes) "
                                       "instead of using the one shipped with oprd, and compare the two"),
    methods: str = typer.Option(None, help="comma-separated subset of teacher,student,opd_top1,opd_top16,oprd,"
                                           "opd_top1_plus_oprd,seq_kd"),
    overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
    bridge: bool = typer.Option(False, "--bridge", help="the OPRD-Bridge experiments instead: cross-architecture, "
                                                        "cross-tokenizer, cross-initialisation teachers"),
    applications: bool = typer.Option(False, "--applications", help="the paper's applications instead: "
                                      "self-distillation with privileged context, two teachers in one student"),
) -> None:
    """The paper's same-architecture experiment in miniature on a toy reasoning task (CPU, minutes).

    Example: oprd demo --out runs/demo --seeds 3 --theorem1   (--bridge: Tables 4-6 in miniature, bridge_results.json;
    --applications: self-distillation and several teachers, applications_results.json)
    """
    from oprd.experiments.applications import run_applications
    from oprd.experiments.bridge_demo import run_bridge_demo
    from oprd.experiments.demo import DemoSettings, run_demo, run_world_only

    with user_errors():
        if bridge and applications:
            raise ValueError("--bridge and --applications are two demos: give one of them")
        if (bridge or applications) and methods:
            raise ValueError("--methods does not apply to --bridge or --applications, which run their own sets")
        if applications and (tune or resume):
            raise ValueError("--applications uses the OPRD settings `oprd demo --tune` chose (shipped, or --tuned "
                             "FILE) and searches none of its own: drop --tune and --resume")
        if world_only and (bridge or applications or tune or tuned or methods or resume):
            raise ValueError("--world-only builds the toy world alone: drop --bridge, --applications, --tune, "
                             "--tuned, --resume and --methods")
        given = {"steps": steps, "oprd_k": oprd_k, "methods": _csv(methods) if methods else None, "seed": seed,
                 "seeds": seeds, "tune": tune, "tuned": tuned, "resume": resume, "threads": threads,
                 "overwrite": overwrite, "rebuild_world": rebuild_world, "theorem1": theorem1}
        given = {k: v for k, v in given.items() if v is not None}
        settings = DemoSettings.quick_run(out, **given) if quick else DemoSettings(out, **given)
        command = (run_world_only if world_only else run_bridge_demo if bridge else run_applications if applications
                   else run_demo)
        command(settings, Console(stderr=True, soft_wrap=True))


if __name__ == "__main__":
    app()
