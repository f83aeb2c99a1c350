"""`oprd bench`: what one actor update costs under each distillation loss.

    oprd bench --preset r1-distill-1.5b --num-layers 4 --seq-len 1024 --batch-size 1 --out runs/bench
    oprd bench --preset qwen3-1.7b --seq-lens 512,1024,2048,4096 --out runs/bench-sweep

Every method runs the engine's own update (`objective.distillation_loss`, then backward) on the same
random-weight student/teacher of the preset's real shapes and the same rollout tokens. Two
references frame them: `floor`, the least any representation loss can cost (student backbone
forward+backward without LM head, teacher backbone up to the deepest needed layer), and `trl`,
TRL's DistillationTrainer loss path (generalized JSD, beta=1: full-vocabulary reverse KL) called
through TRL's own code.

Each (method, shape) is measured in fresh processes. Time: median over repeats after warm-up.
Memory: peak above the update's starting baseline — on CUDA from the allocator's peak counter, on
CPU from the kernel's resident-set high-water mark (`measure`), reset before a final update run. On
CPU the memory runs in a second fresh process whose glibc is told, before anything is allocated, to
hand every block over 64 KiB straight back to the kernel, so RSS follows live tensors. Telling it
only after timed updates is not enough: glibc serves later requests from the free heap chunks those
updates left behind (trimmed, but still in its bins) and keeps them resident once freed, so
activations freed during backward would count again on top of the parameter gradients allocated
after them (docs/bench.md gives the size at the target shape) for every method whose peak comes at the
end of backward (floor, oprd, the OPD methods) but not for one whose peak comes while those
activations are still alive (trl).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import multiprocessing as mp
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from oprd.batch import RolloutBatch
from oprd.capture import capture_hidden, fed_tokens, model_inputs, response_positions
from oprd.config import OPDConfig, OPRDConfig
from oprd.display import markdown_table
from oprd.experiments.measure import release_memory, reset_peak_rss, return_big_blocks_to_kernel, rss_bytes
from oprd.files import holding_out, prepare_output_dir
from oprd.losses import default_chunk_rows, layer_map
from oprd.models import resolve_device, resolve_dtype
from oprd.objective import LossPlan, distillation_loss
from oprd.shapes import SHAPES, shape_config

PROMPT_TOKENS = 64

# Each method's objective sections; OPRD at the paper's settings (all layers, last 2000 positions, 1/d MSE).
PAPER_OPRD = OPRDConfig(coef=1.0, normalize=False, layers="all", positions="last_k", k=2000)
METHODS = {
    "opd_top1": (OPDConfig(objective="sampled"), OPRDConfig()),
    "opd_top16": (OPDConfig(objective="topk", k=16), OPRDConfig()),
    "opd_full": (OPDConfig(objective="full"), OPRDConfig()),
    "oprd": (OPDConfig(), PAPER_OPRD),
    "oprd_plus_opd": (OPDConfig(objective="sampled"), PAPER_OPRD),
}
REFERENCES = ("floor", "trl")
ALL_METHODS = (*METHODS, *REFERENCES)


@dataclass(frozen=True)
class Shape:
    preset: str
    num_layers: int
    seq_len: int  # response tokens per sequence (after a PROMPT_TOKENS-long prompt)
    batch_size: int
    device: str
    dtype: str  # the weights'
    autocast: bool = False  # bf16 autocast over them, as `optim.precision=bf16` trains float32 master weights
    min_len: int | None = None  # response lengths spread evenly from min_len to seq_len; None: all seq_len
    split: str = "whole"  # the update's micro-batches (`split_batch`): whole, size:N, tokens:N or packed:N

    def precision(self):
        """The context one update runs in."""
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16) if self.autocast else nullcontext()


def build_config(shape: Shape):
    config = shape_config(shape.preset, shape.num_layers)
    config.max_position_embeddings = max(config.max_position_embeddings, PROMPT_TOKENS + shape.seq_len)
    return config


def build_models(shape: Shape):
    from transformers import AutoModelForCausalLM

    config = build_config(shape)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[shape.dtype]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.device(shape.device):  # initialised where it runs: a GPU fills 1.5B weights in seconds
            models.append(AutoModelForCausalLM.from_config(config, dtype=dtype))
    student, teacher = models
    teacher.eval().requires_grad_(False)
    return student, teacher


def parameter_count(shape: Shape, backbone_only: bool = False) -> int:
    """Parameters of one model of the shape, counted on the meta device (nothing allocated); the
    backbone alone (no LM head) with `backbone_only`."""
    from transformers import AutoModel, AutoModelForCausalLM

    model_class = AutoModel if backbone_only else AutoModelForCausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in model_class.from_config(build_config(shape)).parameters())


def teacher_weights(shape: Shape) -> dict[str, int]:
    """Bytes of the teacher's weights at the preset's full depth: the whole model, and what an
    OPRD-only run loads (the backbone up to the deepest layer OPRD reads; with the paper's `all`
    layers that is every block, so what it leaves out is the LM head, when it is not tied to the
    embeddings)."""
    full_depth = dataclasses.replace(shape, num_layers=SHAPES[shape.preset]["num_hidden_layers"])
    width = torch.finfo(getattr(torch, shape.dtype)).bits // 8
    whole, backbone = parameter_count(full_depth) * width, parameter_count(full_depth, backbone_only=True) * width
    return {"num_layers": full_depth.num_layers, "whole_bytes": whole, "oprd_only_bytes": backbone,
            "saved_bytes": whole - backbone}


def available_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def check_fits_in_memory(shape: Shape) -> None:
    """Refuses a shape whose student weights + student gradients + teacher weights alone exceed the
    free memory: a lower bound of any update, so the run would be killed part-way."""
    floor = 3 * parameter_count(shape) * torch.finfo(getattr(torch, shape.dtype)).bits // 8
    free = available_memory_bytes(shape.device)
    if floor > free:
        raise ValueError(
            f"{shape.preset} at {shape.num_layers} layers needs at least {floor / 2**30:.1f} GiB on {shape.device} "
            f"(student weights and gradients, teacher weights, {shape.dtype}) but {free / 2**30:.1f} GiB is free: "
            "lower --num-layers (the report projects to full depth) or use --dtype bfloat16"
        )


def make_batch(shape: Shape, vocab: int) -> RolloutBatch:
    """B prompts of PROMPT_TOKENS and responses of seq_len tokens, or with `min_len` of lengths
    spread evenly from min_len to seq_len, in a seeded shuffle (as sampled responses come)."""
    generator = torch.Generator().manual_seed(0)
    B = shape.batch_size
    lengths = torch.full((B,), shape.seq_len)
    if shape.min_len is not None:
        lengths = torch.linspace(shape.min_len, shape.seq_len, B).round().long()[torch.randperm(B, generator=generator)]
    return RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (B, PROMPT_TOKENS), generator=generator),
        prompt_mask=torch.ones(B, PROMPT_TOKENS, dtype=torch.long),
        response_ids=torch.randint(0, vocab, (B, shape.seq_len), generator=generator),
        response_mask=(torch.arange(shape.seq_len)[None] < lengths[:, None]).long(),
        prompt_index=torch.arange(B),
        truncated=torch.zeros(B, dtype=torch.bool),
    ).to(shape.device)


def split_batch(batch: RolloutBatch, split: str) -> list[RolloutBatch]:
    """The micro-batches the trainer makes of `batch`: `whole` (one), `size:N` (`optim.micro_batch_size`),
    `tokens:N` (`optim.micro_batch_tokens`) or `packed:N` (the same with `optim.pack_sequences`)."""
    kind, number = parse_split(split)
    if kind == "whole":
        return [batch]
    if kind == "size":
        return batch.micro_batches(number)
    return batch.grouped(batch.token_budget_groups(number, packed=kind == "packed"), packed=kind == "packed")


def parse_split(split: str) -> tuple[str, int]:
    """`whole`, `size:N`, `tokens:N` or `packed:N` as (kind, N); a ValueError names a malformed one."""
    kind, _, number = split.partition(":")
    if kind == "whole" and not number or kind in ("size", "tokens", "packed") and number.isdigit() and int(number):
        return kind, int(number or 0)
    raise ValueError(f"a split is whole, size:N, tokens:N or packed:N (N >= 1), not {split!r}")


def update_fn(method: str, student, teacher, batch: RolloutBatch, vocab: int, split: str = "whole"):
    """A zero-argument function running one actor update (loss + backward) of `method`, over the
    micro-batches of `split` with the whole batch's normalizers, as the trainer accumulates them."""
    layers = student.config.num_hidden_layers
    if method in METHODS:
        plan = LossPlan.from_config(*METHODS[method], layers, teacher.config.num_hidden_layers, vocab)
        normalizers = plan.normalizers(batch)
        parts = split_batch(batch, split)

        def update() -> None:
            for part in parts:
                distillation_loss(plan, student, teacher, part, normalizers)[0].backward()

        return update
    if split != "whole":
        raise ValueError(f"the {method} reference runs on the whole batch; split {split!r} applies to "
                         f"{', '.join(METHODS)}")
    if method == "floor":
        inputs, keep_B_S = model_inputs(batch), response_positions(batch, batch.response_mask)
        deepest = max(layer_map(layers, teacher.config.num_hidden_layers))
        probe = torch.randn(student.config.hidden_size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(batch.prompt_ids.device)

        def floor() -> None:
            with torch.no_grad():
                capture_hidden(teacher, inputs, [deepest], keep_B_S)
            h = capture_hidden(student, inputs, [layers], keep_B_S)[layers]
            (h.float() @ probe).mean().backward()

        return floor
    if method == "trl":
        return _trl_update(student, teacher, batch)
    raise ValueError(f"unknown bench method {method!r}; choose from {', '.join(ALL_METHODS)}")


def _trl_update(student, teacher, batch: RolloutBatch):
    """TRL's DistillationTrainer._compute_loss on our models, with the trainer's plumbing stubbed
    to single-process identities (what accelerate does on one device)."""
    try:
        from trl.trainer.distillation_trainer import DistillationTrainer
    except ImportError as error:
        raise RuntimeError("the `trl` reference needs TRL: pip install 'oprd[bench]'") from error
    trainer = SimpleNamespace(
        beta=1.0,  # reverse KL, like our OPD objectives
        temperature=1.0,
        teacher_model=teacher,
        accelerator=SimpleNamespace(unwrap_model=lambda model: model, is_main_process=True),
        _forward_redirection=lambda wrapper, module, fn, *args, **kwargs: fn(*args, **kwargs),
        model_kwarg_keys=set(inspect.signature(student.forward).parameters),
        _is_vlm=False,
    )
    trainer._get_last_hidden_state = DistillationTrainer._get_last_hidden_state.__get__(trainer)
    inputs = {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask,
              "completion_ids": batch.response_ids, "completion_mask": batch.response_mask}
    return lambda: DistillationTrainer._compute_loss(trainer, student, inputs, None)[0].backward()


# --------------------------------------------------------------------------- measuring


def measure(method: str, shape: Shape, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds of one update in this process, with the allocator as users run it; on CUDA also
    the peak memory above baseline, from the allocator's counter. CPU memory: `measure_cpu_memory`."""
    torch.manual_seed(0)
    student, teacher = build_models(shape)
    vocab = student.config.vocab_size
    batch = make_batch(shape, vocab)
    run = update_fn(method, student, teacher, batch, vocab, shape.split)
    cuda = shape.device.startswith("cuda")
    seconds, peaks = [], []
    for i in range(warmup + repeats):
        student.zero_grad(set_to_none=True)
        release_memory()
        if cuda:
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with shape.precision():
            run()
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - baseline)
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
    result = {"step_seconds": statistics.median(seconds), "repeats": repeats}
    if cuda:
        result["peak_memory_delta_bytes"] = int(max(peaks))
    return result


def measure_cpu_memory(method: str, shape: Shape, warmup: int = 1) -> dict[str, int]:
    """Peak resident memory above baseline of one update, from the kernel's high-water mark.

    Meaningful only in a process that called `measure.return_big_blocks_to_kernel` before its first
    large allocation (`_child` does): then every block over 64 KiB is its own mapping, returned to
    the kernel when freed, and RSS follows live tensors.
    """
    torch.manual_seed(0)
    student, teacher = build_models(shape)
    vocab = student.config.vocab_size
    batch = make_batch(shape, vocab)
    run = update_fn(method, student, teacher, batch, vocab, shape.split)
    for _ in range(warmup):  # one-time state (thread pools, kernel caches) stays out of the delta
        student.zero_grad(set_to_none=True)
        with shape.precision():
            run()
    student.zero_grad(set_to_none=True)
    release_memory()
    baseline = rss_bytes()
    reset_peak_rss()
    with shape.precision():
        run()
    return {"peak_memory_delta_bytes": rss_bytes("VmHWM") - baseline}


def _child(part: str, method: str, shape: Shape, repeats: int, queue) -> None:
    try:
        if part == "memory":
            return_big_blocks_to_kernel()
        torch.set_num_threads(int(os.environ.get("OPRD_BENCH_THREADS", torch.get_num_threads())))
        queue.put(measure_cpu_memory(method, shape) if part == "memory" else measure(method, shape, repeats))
    except Exception as error:  # reported by the parent with the method's name
        queue.put({"error": f"{type(error).__name__}: {error}"})


def _in_fresh_process(part: str, method: str, shape: Shape, repeats: int) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(part, method, shape, repeats, queue))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"bench method {method} failed: {result['error']}")
    return result


def measure_in_fresh_process(method: str, shape: Shape, repeats: int) -> dict[str, float]:
    """Time in one fresh process; on CPU, memory in another (see the module docstring)."""
    result = _in_fresh_process("time", method, shape, repeats)
    if not shape.device.startswith("cuda"):
        result.update(_in_fresh_process("memory", method, shape, repeats))
    return {"step_seconds": result["step_seconds"], "peak_memory_delta_bytes": int(result["peak_memory_delta_bytes"]),
            "repeats": repeats}


# --------------------------------------------------------------------------- the report


def layer_flops_per_token(config, context: int) -> float:
    """Forward FLOPs of one block for one token: 2 x weights + attention over `context` tokens."""
    D, H = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or D // heads  # Qwen2's and Phi-3's configs derive it
    weights = D * heads * head_dim * 2 + D * kv * head_dim * 2 + 3 * D * H
    return 2 * weights + 4 * context * heads * head_dim


def flop_model(shape: Shape) -> dict[str, float]:
    """Arithmetic of one update: backbones vs LM heads (forward = 1x, backward = 2x)."""
    config = build_config(shape)
    tokens = shape.batch_size * (PROMPT_TOKENS + shape.seq_len)
    response = shape.batch_size * shape.seq_len
    per_layer = tokens * layer_flops_per_token(config, (PROMPT_TOKENS + shape.seq_len) // 2)
    head = 2 * response * config.hidden_size * config.vocab_size
    backbones = 4 * per_layer * config.num_hidden_layers  # student fwd+bwd (3x) + teacher fwd (1x)
    heads = 4 * head  # student head fwd+bwd (3x) + teacher head fwd (1x)
    return {"backbones": backbones, "lm_heads": heads, "lm_head_share_of_opd": heads / (backbones + heads)}


def project(methods: dict[str, dict], shape: Shape) -> dict[str, dict[str, float]]:
    """Measured costs carried to the preset's full depth. Per-layer: the floor's time, and the floor's
    memory less the embedding's gradient (vocabulary x width, alive at the end of backward whatever the
    depth); each method's excess over the floor is taken as depth-independent (the LM heads, the loss)."""
    full = SHAPES[shape.preset]["num_hidden_layers"]
    scale = (full - shape.num_layers) / shape.num_layers
    floor = methods["floor"]
    config = build_config(shape)
    embedding_grad = config.vocab_size * config.hidden_size * (torch.finfo(getattr(torch, shape.dtype)).bits // 8)
    per_layers_memory = max(floor["peak_memory_delta_bytes"] - embedding_grad, 0)
    projected = {}
    for name, m in methods.items():
        projected[name] = {
            "step_seconds": m["step_seconds"] + floor["step_seconds"] * scale,
            "peak_memory_delta_bytes": m["peak_memory_delta_bytes"] + per_layers_memory * scale,
        }
    return projected


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares line y = intercept + slope * x; returns (slope, intercept, largest |residual|)."""
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = np.abs(np.asarray(ys) - (intercept + slope * np.asarray(xs))).max()
    return float(slope), float(intercept), float(residual)


def sweep_fit(sweep: list[dict]) -> dict[str, dict[str, float]]:
    """Per method, how time and memory grow with response tokens across a sequence-length sweep.

    A method's peak is the larger of two things: the parameter gradients alive at the end of backward
    (constant in length) and the activations kept for backward (linear in it), so the whole curve is
    flat and then linear, and one straight line through it would mislead. Reported instead: the
    least-squares slope of time; the memory growth between the two longest lengths (the activation
    regime); and a least-squares line through the memory above `floor`, which is what the loss itself
    holds beyond the backbones.
    """
    rows = sorted(sweep, key=lambda row: row["seq_len"])
    lengths = [row["seq_len"] for row in rows]

    def series(name: str, key: str) -> list[float]:
        return [row["methods"][name][key] for row in rows]

    fits = {}
    for name in rows[0]["methods"]:
        memory = series(name, "peak_memory_delta_bytes")
        fit = {"seconds_per_token": linear_fit(lengths, series(name, "step_seconds"))[0],
               "memory_bytes_per_token_at_longest": (memory[-1] - memory[-2]) / (lengths[-1] - lengths[-2])}
        if name != "floor" and "floor" in rows[0]["methods"]:
            excess = [m - f for m, f in zip(memory, series("floor", "peak_memory_delta_bytes"))]
            slope, intercept, residual = linear_fit(lengths, excess)
            fit.update(memory_over_floor_bytes_per_token=slope, memory_over_floor_intercept_bytes=intercept,
                       memory_over_floor_max_residual_bytes=residual)
        fits[name] = fit
    return fits


def _ratio_table(methods: dict[str, dict], title: str) -> list[str]:
    oprd, floor = methods.get("oprd"), methods.get("floor")

    def ratio(ref, key, value):
        return f"{value / ref[key]:.2f}" if ref and ref[key] > 0 else "-"

    rows = []
    for name, m in methods.items():
        t, b = m["step_seconds"], m["peak_memory_delta_bytes"]
        rows.append([name, f"{t:.3f}", ratio(oprd, "step_seconds", t), ratio(floor, "step_seconds", t),
                     f"{b / 2**20:.0f}", ratio(oprd, "peak_memory_delta_bytes", b),
                     ratio(floor, "peak_memory_delta_bytes", b)])
    header = ["method", "update s", "x oprd", "x floor", "peak delta MiB", "x oprd", "x floor"]
    return [f"### {title}", "", *markdown_table(header, rows), ""]


def write_report(result: dict, out: Path) -> None:
    shape = Shape(result["preset"], result["num_layers"], result["seq_len"], result["batch_size"],
                  result["device"], result["dtype"], result.get("autocast", False))
    full_layers = SHAPES[shape.preset]["num_hidden_layers"]
    flops = flop_model(shape)
    lines = [
        f"# oprd bench: {shape.preset}",
        "",
        f"Device {result['device']} ({result['dtype']}{' under bf16 autocast' if shape.autocast else ''}), "
        f"{shape.num_layers} of the preset's {full_layers} layers "
        f"(random weights, real widths and vocabulary), batch {shape.batch_size}, {PROMPT_TOKENS}-token prompt + "
        f"{shape.seq_len} response tokens. One update = teacher scoring + student forward + loss + backward; "
        f"median of {result['repeats']} repeats after a warm-up, each method in a fresh process. Peak memory is "
        "above the update's starting baseline.",
        "",
        *_ratio_table(result["methods"], "Measured"),
    ]
    if shape.num_layers < full_layers and "floor" in result["methods"]:
        lines += _ratio_table(project(result["methods"], shape),
                              f"Projection to {full_layers} layers (cost model, not a measurement)")
    lines += [
        "### Why",
        "",
        f"At this shape the two LM heads are {100 * flops['lm_head_share_of_opd']:.0f}% of an OPD update's "
        f"arithmetic ({flops['lm_heads'] / 1e9:.3g} GFLOP of {(flops['lm_heads'] + flops['backbones']) / 1e9:.3g}); "
        "OPRD skips both heads, and the teacher never computes logits. The paper measured 1.44x less time and "
        "54% less memory for OPRD against an unoptimised top-16 OPD; here every OPD path is already chunked "
        "(no (B, T, V) logits are kept), so the gap is what the heads themselves cost.",
    ]
    config = build_config(shape)
    vocab_grad = config.vocab_size * config.hidden_size * 4
    chunk_rows = default_chunk_rows(config.vocab_size, torch.device(result["device"]).type)
    teacher = result.get("teacher_weights") or teacher_weights(shape)
    lines += [
        "",
        "### Teacher weights an OPRD-only run loads",
        "",
        f"At the preset's full depth ({teacher['num_layers']} layers, {shape.dtype}) the whole teacher is "
        f"{teacher['whole_bytes'] / 2**30:.2f} GiB; an OPRD-only run loads it only up to the deepest layer it reads "
        f"(all of them in the paper's recipe) and without the LM head: {teacher['oprd_only_bytes'] / 2**30:.2f} GiB, "
        f"{teacher['saved_bytes'] / 2**30:.2f} GiB less"
        + (" (this preset ties the head to the embeddings, so there is nothing to leave out)."
           if teacher["saved_bytes"] == 0 else ". Per process under FSDP, divide both by the number of processes."),
        "",
        "### What dominates",
        "",
        f"- `floor` and `oprd`: the student's parameter gradients, all alive at the end of backward: the "
        f"embedding's ({vocab_grad / 2**20:.0f} MiB, vocabulary x width in float32) and the blocks' (linear in "
        "layers); or, at long sequences, the activations kept for backward (linear in tokens and layers). OPRD adds "
        "only the teacher's hidden states at the supervised positions (tokens x width per layer).",
        f"- OPD: the same, plus the LM head's gradient (another {vocab_grad / 2**20:.0f} MiB): the least any "
        f"update that trains the head can hold. The chunks of {chunk_rows} positions x {config.vocab_size} logits "
        f"(a few float32 buffers of {chunk_rows * config.vocab_size * 4 / 2**20:.0f} MiB) are freed before "
        "backward ends and do not depend on sequence length.",
        "- `trl`: TRL's chunked divergence kernel, which also never materialises full logits but projects "
        "every position through both heads more than once; its peak comes at the start of its backward, where the "
        "head's gradient and its tiles (without Triton: up to 4096 positions x 32768 vocabulary entries each, several "
        "alive at once) join the student's activations.",
    ]
    if "sweep" in result:
        lines += ["", "### Sequence-length sweep", "",
                  *markdown_table(["seq len", *result["methods"]], (
                      [row["seq_len"], *(f"{m['step_seconds']:.2f} s / {m['peak_memory_delta_bytes'] / 2**20:.0f} MiB"
                                         for m in row["methods"].values())] for row in result["sweep"]))]
        lines += ["", "How each method grows with response tokens: time (least-squares slope), peak memory between "
                  "the two longest lengths (where activations rather than gradients set the peak), and the memory "
                  "above `floor` (least-squares line: what the loss holds beyond the backbones).", ""]
        rows = []
        for name, fit in result["sweep_fit"].items():
            over = [f"{fit[key] * scale / 2**20:.0f}" if key in fit else "-" for key, scale in (
                ("memory_over_floor_bytes_per_token", 1000), ("memory_over_floor_intercept_bytes", 1),
                ("memory_over_floor_max_residual_bytes", 1))]
            rows.append([name, f"{fit['seconds_per_token'] * 1000:.2f}",
                         f"{fit['memory_bytes_per_token_at_longest'] * 1000 / 2**20:.0f}", *over])
        lines += markdown_table(["method", "s per 1k tokens", "MiB per 1k tokens, longest",
                                 "over floor: MiB per 1k tokens", "over floor: MiB at 0 tokens",
                                 "over floor: max residual MiB"], rows)
    (out / "bench.md").write_text("\n".join(lines) + "\n")


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    if "sweep" in result:  # several lengths: a line per method
        rows = result["sweep"]
        for name in result["methods"]:
            lengths = [r["seq_len"] for r in rows]
            ax_time.plot(lengths, [r["methods"][name]["step_seconds"] for r in rows], marker="o", label=name)
            ax_mem.plot(lengths, [r["methods"][name]["peak_memory_delta_bytes"] / 2**20 for r in rows], marker="o",
                        label=name)
        ax_time.set(xlabel="response tokens")
        ax_mem.set(xlabel="response tokens")
        ax_mem.legend()
    else:  # one shape: a bar per method, the floor (no LM head) marked
        names = list(result["methods"])
        for axis, key, scale in ((ax_time, "step_seconds", 1), (ax_mem, "peak_memory_delta_bytes", 2**20)):
            values = [result["methods"][name][key] / scale for name in names]
            bars = axis.bar(names, values, color=["tab:gray" if n == "floor" else "tab:blue" for n in names])
            axis.bar_label(bars, fmt="%.3g", fontsize=7)
            if "floor" in result["methods"]:
                axis.axhline(result["methods"]["floor"][key] / scale, color="tab:gray", linestyle="--", label="floor")
                axis.legend()
            axis.tick_params(axis="x", rotation=30)
        ax_time.set(xlabel=f"method ({result['seq_len']} response tokens)")
        ax_mem.set(xlabel=f"method ({result['seq_len']} response tokens)")
    ax_time.set(ylabel="update seconds", title="time per actor update")
    ax_mem.set(ylabel="peak memory above baseline (MiB)", title="transient memory")
    fig.suptitle(f"{result['preset']}, {result['num_layers']} layers, batch {result['batch_size']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    plt.close(fig)


@dataclass
class BenchSettings:
    """`oprd bench`: one preset's shapes, the methods to measure and where the report goes."""

    out: Path
    preset: str = "r1-distill-1.5b"
    seq_lens: list[int] = field(default_factory=lambda: [1024])  # response tokens; several make a sweep
    num_layers: int | None = None  # None: 4 on a CPU (a depth it can run), the preset's own on a GPU
    batch_size: int = 1
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    repeats: int = 3  # timed updates per method after one warm-up
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    autocast: bool = False  # bf16 autocast over the weights (with dtype float32: how training runs on a GPU)
    min_len: int | None = None  # mixed response lengths, from min_len to the sequence length
    splits: list[str] = field(default_factory=lambda: ["whole"])  # several: compare micro-batchings (`split_batch`)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.preset not in SHAPES:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(SHAPES)}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
        if not self.seq_lens or min(self.seq_lens) < 1 or len(set(self.seq_lens)) != len(self.seq_lens):
            raise ValueError(f"sequence lengths must be distinct positive numbers, got {self.seq_lens}")
        for split in self.splits:
            parse_split(split)
        if self.splits != ["whole"] and len(self.seq_lens) > 1:
            raise ValueError("--splits compares micro-batchings at one sequence length: give --seq-len, not --seq-lens")
        if self.min_len is not None and not 1 <= self.min_len <= min(self.seq_lens):
            raise ValueError(f"--min-len must be between 1 and the sequence length, got {self.min_len}")

    def shape(self, seq_len: int) -> Shape:
        device = resolve_device(self.device)
        num_layers = self.num_layers or (SHAPES[self.preset]["num_hidden_layers"] if device.type == "cuda" else 4)
        dtype = str(resolve_dtype(self.dtype, device)).removeprefix("torch.")
        return Shape(self.preset, num_layers, seq_len, self.batch_size, str(device), dtype, self.autocast, self.min_len)


@holding_out
def run_bench(settings: BenchSettings, progress=None) -> dict:
    """Measures every method at every sequence length; writes bench.json, bench.md, bench.png."""
    s = settings
    shapes = [s.shape(seq_len) for seq_len in s.seq_lens]
    check_fits_in_memory(max(shapes, key=lambda shape: shape.seq_len))
    out = prepare_output_dir(s.out, overwrite=s.overwrite, overwrite_flag="--overwrite", ours=None)
    if s.splits != ["whole"]:
        return measure_splits(s, shapes[0], out, progress)
    sweep = []
    for shape in shapes:
        measured = {}
        for method in s.methods:
            if progress:
                progress(f"{method} @ {shape.seq_len} tokens")
            measured[method] = measure_in_fresh_process(method, shape, s.repeats)
        sweep.append({"seq_len": shape.seq_len, "methods": measured})
    first = shapes[0]
    result = {"device": first.device, "dtype": first.dtype, "autocast": first.autocast, "preset": s.preset,
              "num_layers": first.num_layers,
              "seq_len": first.seq_len, "batch_size": s.batch_size, "repeats": s.repeats,
              "methods": sweep[0]["methods"]}
    if len(sweep) > 1:
        result["sweep"] = sweep
        result["sweep_fit"] = sweep_fit(sweep)
    if first.num_layers < SHAPES[s.preset]["num_hidden_layers"] and "floor" in result["methods"]:
        result["projection"] = {"num_layers": SHAPES[s.preset]["num_hidden_layers"],
                                "methods": project(result["methods"], first)}
    result["flops"] = flop_model(first)
    if "trl" in s.methods:  # the peer's private loss path changes between TRL releases: say which one was measured
        result["trl_version"] = importlib.metadata.version("trl")
    result["teacher_weights"] = teacher_weights(first)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    write_report(result, out)
    plot(result, out)
    return result


def measure_splits(s: BenchSettings, shape: Shape, out: Path, progress=None) -> dict:
    """Each method's update over each micro-batching of one mixed-length batch: splits.json, splits.md."""
    batch = make_batch(shape, build_config(shape).vocab_size)
    splits = {}
    for split in s.splits:
        parts = split_batch(batch, split)
        real, slots = (sum(counts) for counts in zip(*map(fed_tokens, parts)))
        splits[split] = {"micro_batches": len(parts), "padding_share": 1 - real / slots,
                         "largest_micro_batch_tokens": max(fed_tokens(part)[1] for part in parts), "methods": {}}
        for method in s.methods:
            if progress:
                progress(f"{method} over {split}")
            splits[split]["methods"][method] = measure_in_fresh_process(method, dataclasses.replace(shape, split=split),
                                                                        s.repeats)
    result = {"device": shape.device, "dtype": shape.dtype, "autocast": shape.autocast, "preset": s.preset,
              "num_layers": shape.num_layers, "seq_len": shape.seq_len, "min_len": shape.min_len,
              "batch_size": s.batch_size, "repeats": s.repeats, "splits": splits}
    (out / "splits.json").write_text(json.dumps(result, indent=2))
    lengths = (f"responses of {shape.min_len} to {shape.seq_len} tokens" if shape.min_len is not None
               else f"responses of {shape.seq_len} tokens")
    lines = [f"# oprd bench: micro-batches, {shape.preset}", "",
             f"Device {shape.device} ({shape.dtype}{' under bf16 autocast' if shape.autocast else ''}), "
             f"{shape.num_layers} layers, one batch of {s.batch_size} sequences: {PROMPT_TOKENS}-token prompts, "
             f"{lengths}. One update = every micro-batch's teacher scoring, loss and backward, accumulated; "
             f"median of {s.repeats} after a warm-up, each in a fresh process; peak memory above the update's "
             "starting baseline. `size:N`: N sequences a micro-batch; `tokens:N`: `optim.micro_batch_tokens=N`; "
             "`packed:N`: the same with `optim.pack_sequences=true` (the budget counts real tokens).", "",
             *markdown_table(["split", "micro-batches", "padding", "largest (tokens)",
                              *(f"{method}: s / peak MiB" for method in s.methods)],
                             ([split, row["micro_batches"], f"{100 * row['padding_share']:.0f}%",
                               row["largest_micro_batch_tokens"],
                               *(f"{m['step_seconds']:.2f} / {m['peak_memory_delta_bytes'] / 2**20:.0f}"
                                 for m in row["methods"].values())] for split, row in splits.items()))]
    (out / "splits.md").write_text("\n".join(lines) + "\n")
    return result


# --------------------------------------------------------------------------- rollout throughput


@dataclass
class RolloutBenchSettings:
    """`oprd bench --rollout`: tokens per second of transformers' generate and of a vLLM server,
    on the same model and prompts."""

    out: Path
    model: str  # a local model folder (the server reloads its weights)
    vllm_url: str | None = None  # without a server, only transformers' generate is measured
    data: str = "aime24"
    prompts: int = 16
    responses_per_prompt: int = 2
    max_new_tokens: int = 256
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("prompts", "responses_per_prompt", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@holding_out
def run_rollout_bench(s: RolloutBenchSettings, progress=None) -> dict:
    """Samples the same prompts with each backend after one warm-up call; writes rollout.json and
    rollout.md. Tokens are response tokens (EOS included); time is the wall clock of one call."""
    from oprd.data import PromptSet, load_problems
    from oprd.models import ModelSpec, load_model, load_tokenizer
    from oprd.rollout import HFRollout, SamplingParams

    out = prepare_output_dir(s.out, overwrite=s.overwrite, overwrite_flag="--overwrite", ours=None)
    spec = ModelSpec(model=s.model)
    tokenizer = load_tokenizer(spec)
    prompts = PromptSet.render(load_problems(s.data, limit=s.prompts), tokenizer).student
    params = SamplingParams(temperature=1.0, max_new_tokens=s.max_new_tokens, n=s.responses_per_prompt)
    device = resolve_device(s.device)
    backends = {"transformers generate": lambda: HFRollout.for_model(load_model(spec, device), tokenizer)}
    if s.vllm_url:
        from oprd.vllm_backend import Sampling, ServerRollout

        def server():
            rollout = ServerRollout(s.vllm_url, Sampling.of_folder(s.model, tokenizer),
                                    weights_dir=out / ".vllm-weights")
            rollout.load_folder(Path(s.model))
            return rollout

        backends[f"vLLM server ({s.vllm_url})"] = server
    measured = {}
    for name, make in backends.items():
        if progress:
            progress(name)
        rollout = make()
        torch.manual_seed(0)
        rollout.generate(prompts[:1], dataclasses.replace(params, n=1))  # warm-up: kernels, caches, connection
        started = time.perf_counter()
        batch = rollout.generate(prompts, params)
        seconds = time.perf_counter() - started
        tokens = int(batch.response_lengths.sum())
        measured[name] = {"seconds": seconds, "response_tokens": tokens, "tokens_per_second": tokens / seconds,
                          "sequences": int(batch.response_ids.shape[0])}
    result = {"model": s.model, "data": s.data, "prompts": len(prompts), "responses_per_prompt": s.responses_per_prompt,
              "max_new_tokens": s.max_new_tokens, "device": str(device), "backends": measured}
    (out / "rollout.json").write_text(json.dumps(result, indent=2))
    rows = [[name, m["sequences"], m["response_tokens"], f"{m['seconds']:.2f}", f"{m['tokens_per_second']:.1f}"]
            for name, m in measured.items()]
    (out / "rollout.md").write_text("\n".join([
        f"# oprd bench --rollout: {s.model}", "",
        f"{len(prompts)} prompts of {s.data} x {s.responses_per_prompt} responses, up to {s.max_new_tokens} new "
        f"tokens at temperature 1, one call after a warm-up; transformers on {device}.", "",
        *markdown_table(["backend", "sequences", "response tokens", "seconds", "tokens/s"], rows), ""]))
    return result
