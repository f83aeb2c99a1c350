"""Published models' shapes, offline: one table of their config.json fields, and a random-weight
model folder of any of them that loads as the hub checkpoint's folder would.

    oprd make-model qwen3-0.6b runs/models/student --tokenizer ../shared/data/tokenizers/qwen3 --seed 0
    oprd make-model qwen3-0.6b runs/models/tiny-real --tokenizer ../shared/data/tokenizers/qwen3 --layers 1

The folder holds config.json (the published one's architecture fields; `--layers` cuts the depth
and nothing else), model.safetensors in the published dtype, generation_config.json where the table
has the published one, and the tokenizer files copied unchanged (so the chat template is the real
one). `oprd bench` measures the same table's shapes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig

from oprd.models import DTYPES

_QWEN3_GENERATION = dict(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=True,
                         temperature=0.6, top_k=20, top_p=0.95)

# config.json of each hub repo: the fields that set the architecture (everything else is the
# architecture's default). Phi-4-mini's longrope scaling factors are left out: they change the
# rotary frequencies beyond 4,096 positions, not any tensor's shape.
SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       bos_token_id=151643, eos_token_id=151645),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       bos_token_id=151643, eos_token_id=151645),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=9728, vocab_size=151936,
                     tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     bos_token_id=151643, eos_token_id=151645),
    "r1-distill-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                            num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                            tie_word_embeddings=False, rope_theta=1e4, max_position_embeddings=131072,
                            rms_norm_eps=1e-6, bos_token_id=151646, eos_token_id=151643),
    "phi-4-mini": dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=24,
                       num_key_value_heads=8, intermediate_size=8192, vocab_size=200064, tie_word_embeddings=True,
                       rope_theta=1e4, partial_rotary_factor=0.75, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999),
    # Not a published model: the bench's smallest shape, for a quick look at the plumbing.
    "tiny": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=1024,
                 tie_word_embeddings=False),
}
# generation_config.json of the hub repos whose one the table carries (the others get none).
GENERATION = {"qwen3-0.6b": _QWEN3_GENERATION, "qwen3-1.7b": _QWEN3_GENERATION, "qwen3-4b": _QWEN3_GENERATION}
PUBLISHED_DTYPE = "bfloat16"


def shape_config(name: str, num_layers: int | None = None) -> PretrainedConfig:
    """The config of shape `name`, at `num_layers` blocks if given (its own depth otherwise)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose from {', '.join(SHAPES)}")
    fields = dict(SHAPES[name])
    if num_layers is not None:
        if not 1 <= num_layers <= fields["num_hidden_layers"]:
            raise ValueError(f"--layers must be between 1 and {name}'s {fields['num_hidden_layers']}, got {num_layers}")
        fields["num_hidden_layers"] = num_layers
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def write_model_folder(name: str, out: str | Path, *, tokenizer: str | Path, seed: int = 0,
                       num_layers: int | None = None, dtype: str = PUBLISHED_DTYPE) -> Path:
    """A random-weight model of shape `name` (weights from `seed`) with the tokenizer folder
    `tokenizer` copied beside it, written to `out` (which must not exist) in one rename."""
    out, tokenizer = Path(out), Path(tokenizer)
    if out.exists():
        raise FileExistsError(f"{out} exists: give a new folder (nothing is overwritten)")
    config = shape_config(name, num_layers)
    rows = len(AutoTokenizer.from_pretrained(tokenizer))
    if rows > config.vocab_size:
        raise ValueError(f"the tokenizer at {tokenizer} has {rows} tokens, more than {name}'s {config.vocab_size} "
                         "embedding rows: give the tokenizer of this model's family")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # drawn in float32 on every machine
    model.to(DTYPES[dtype]).save_pretrained(partial)
    if name in GENERATION:
        GenerationConfig(**GENERATION[name]).save_pretrained(partial)
    for file in sorted(tokenizer.iterdir()):
        if file.is_file():
            shutil.copyfile(file, partial / file.name)  # not the source's read-only mode
    partial.rename(out)
    return out
