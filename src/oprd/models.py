"""Loading students, teachers and tokenizers from the hub, a local path, or a bare config.

A model reference is a hub id (`Qwen/Qwen3-1.7B`) or a local directory. With
`random_init=True` only the directory's (or hub repo's) `config.json` is read and the weights are
initialised from `init_seed`: this is how the tests and smoke recipes build tiny models offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

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


def load_model_config(spec: ModelSpec) -> PretrainedConfig:
    return AutoConfig.from_pretrained(spec.model, revision=spec.revision, trust_remote_code=spec.trust_remote_code)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        spec.tokenizer or spec.model, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    dtype = dtype or resolve_dtype(spec.dtype, device)
    extra = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    if spec.random_init:
        config = load_model_config(spec)
        # fork_rng keeps the caller's generator untouched, so initialising a model never shifts
        # the sampling stream of a run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=spec.trust_remote_code, **extra
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec.model,
            revision=spec.revision,
            dtype=dtype,
            trust_remote_code=spec.trust_remote_code,
            **extra,
        )
    return model.to(device)


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


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone without the LM head (embeddings, blocks, final norm)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model
