"""Loading students, teachers and tokenizers from the hub, a local path, or a bare config.

A model reference is a hub id (`Qwen/Qwen3-1.7B`) or a local directory. With
`random_init=True` only the directory's (or hub repo's) `config.json` is read and the weights are
initialised from `init_seed`: this is how the tests and smoke recipes build tiny models offline.
"""

from __future__ import annotations

import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Where a model comes from and how to build it (the `student.*` / `teacher.*` config keys)."""

    model: str = ""
    revision: str | None = None
    tokenizer: str | None = None  # defaults to `model`
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    random_init: bool = False
    init_seed: int = 0
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    shard: bool = True  # under torchrun: sharded across processes (FSDP2); false: a full copy in each


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # the `device` settings oprd reads


def device_problem(name: str) -> str | None:
    """What is wrong with a `device` setting, or None: a name oprd does not read, or a GPU that
    torch cannot see."""
    if not DEVICE.match(name):
        return f"device must be auto, cpu, cuda or cuda:N; got {name!r}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        return f"device={name} but no GPU is visible to torch (torch {torch.__version__}); use device=cpu or auto"
    return None


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU, float32 on the CPU (where bfloat16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def check_source(source: str, field: str, revision: str | None = None) -> None:
    """Fails fast, in one line, when `source` can be neither a local model folder nor a hub repo
    that is cached or reachable, instead of transformers' long traceback (or a minute of retries
    when the hub cannot be reached). `field` names the option in the message."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"{field}={source} is a folder without config.json or tokenizer files: "
                                    "point it at a Hugging Face model folder")
        return
    if path.exists():
        raise FileNotFoundError(f"{field}={source} is a file; it must be a model folder or a hub id (owner/name)")
    if not HUB_ID.match(source):
        raise FileNotFoundError(f"{field}={source}: no such folder, and not a hub id (owner/name)")
    if isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str):
        return  # in the local hub cache: transformers can load it offline
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(f"{field}={source}: no such folder, and the hub repo is not in the local cache "
                                "(HF_HUB_OFFLINE is set)")
    if not hub_reachable():
        raise FileNotFoundError(f"{field}={source}: no such folder, and the hub cannot be reached to download it: "
                                "give a local model folder, or download it first")


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether a connection to the hub opens within `timeout_s` (name lookup included)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)

    def connect() -> None:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=timeout_s)
        return True
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def load_model_config(spec: ModelSpec) -> PretrainedConfig:
    return AutoConfig.from_pretrained(spec.model, revision=spec.revision, trust_remote_code=spec.trust_remote_code)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        spec.tokenizer or spec.model, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype | None = None,
               up_to_layer: int | None = None) -> torch.nn.Module:
    """The model of `spec` on `device`. With `up_to_layer`, only its backbone up to that block: no
    later blocks and no LM head (a teacher that only hands hidden states to OPRD); `full_depth`
    still reports the published depth."""
    dtype = dtype or resolve_dtype(spec.dtype, device)
    config = model_config(spec, up_to_layer)
    options = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code)
    if spec.attn_implementation:
        options["attn_implementation"] = spec.attn_implementation
    if spec.random_init:
        # fork_rng keeps the caller's generator untouched, so initialising a model never shifts
        # the sampling stream of a run. The whole model is initialised and then cut, so its blocks
        # get the weights they get in the whole model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(load_model_config(spec), **options)
        if up_to_layer is not None:
            model = _cut(model, config)
    elif up_to_layer is None:
        model = AutoModelForCausalLM.from_pretrained(spec.model, config=config, revision=spec.revision, **options)
    else:
        model = _load_backbone(spec, config, options)
    return model.to(device)


def _load_backbone(spec: ModelSpec, config: PretrainedConfig, options: dict) -> torch.nn.Module:
    """A cut backbone from a causal LM checkpoint. The weights it leaves out (the LM head, later
    blocks) are meant to be left out, so transformers' report of them is not printed; a weight the
    backbone needs and the checkpoint lacks is still an error."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModel.from_pretrained(spec.model, config=config, revision=spec.revision,
                                                output_loading_info=True, **options)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])  # (a mis-sized weight already raised in transformers)
    if missing:
        raise ValueError(f"{spec.model}: the checkpoint lacks weights the model needs ({', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}): is it the model its config.json describes?")
    return model


def _cut(model: torch.nn.Module, config: PretrainedConfig) -> torch.nn.Module:
    """The backbone of a causal LM with only the blocks `config` (from `model_config`) keeps. The
    backbone keeps its own config object (it carries what loading resolved, e.g. the attention
    implementation), told the new depth."""
    backbone = base_model(model)
    kept = config.num_hidden_layers
    del decoder_layers(backbone)[kept:]
    if kept < backbone.config.num_hidden_layers:
        backbone.config.full_num_hidden_layers = backbone.config.num_hidden_layers
        backbone.config.num_hidden_layers = kept
    return backbone


def empty_model(spec: ModelSpec, dtype: torch.dtype, up_to_layer: int | None = None) -> torch.nn.Module:
    """The model of `spec` on the meta device: its structure, no memory (to be sharded and filled)."""
    model_class = AutoModel if up_to_layer is not None else AutoModelForCausalLM
    options = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    with torch.device("meta"):
        return model_class.from_config(model_config(spec, up_to_layer), dtype=dtype,
                                       trust_remote_code=spec.trust_remote_code, **options)


def model_config(spec: ModelSpec, up_to_layer: int | None = None) -> PretrainedConfig:
    config = load_model_config(spec)
    if up_to_layer is not None and up_to_layer < config.num_hidden_layers:
        config.full_num_hidden_layers = config.num_hidden_layers
        config.num_hidden_layers = up_to_layer
    return config


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of a parameter holding NaN or infinity, or None: one reduction per tensor and a
    single sync, cheap enough to run after every optimizer step."""
    named = [(name, p) for name, p in model.named_parameters() if p.numel()]
    peaks = torch.stack([p.detach().abs().amax().float() for _, p in named])
    if bool(torch.isfinite(peaks).all()):
        return None
    return next(name for name, p in named if not bool(torch.isfinite(p).all()))


def check_spec(spec: ModelSpec, field: str) -> None:
    """`check_source` for a model spec's weights (or config) and tokenizer."""
    check_source(spec.model, f"{field}.model", spec.revision)
    if spec.tokenizer:
        check_source(spec.tokenizer, f"{field}.tokenizer", spec.revision)


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the generation config's (chat models end turns with their
    own token, e.g. <|im_end|>) plus the tokenizer's EOS."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if value is None:
            continue
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an EOS token")
    return ids


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks, in order (HF keeps them at `<base>.layers`, GPT-2 style at `.h`)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise TypeError(f"cannot find the decoder blocks of {type(model).__name__} (looked for .layers and .h)")


def full_depth(model: torch.nn.Module) -> int:
    """The number of blocks of the model as published: more than it holds when it was loaded only
    up to a layer (`load_model(up_to_layer=...)`), whose last block then is not the published last."""
    return int(getattr(model.config, "full_num_hidden_layers", None) or len(decoder_layers(model)))


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone without the LM head (embeddings, blocks, final norm)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model
