"""Offline stand-ins for what a hub would provide: small configs of real architectures and
tokenizers trained on the spot. The tests, the smoke recipes' assets and the toy world build their
models from these, so nothing is downloaded and every build is the same on every machine. And the
one way the fault tests crash a whole job (`kill_job`)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable
from pathlib import Path

import psutil
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, split_digits: bool = False
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with a ChatML template, saved in HF format to `out_dir`.

    split_digits=True keeps every digit its own token (as Llama/Qwen tokenizers do), so numbers
    are never merged into arbitrary chunks.
    """
    core = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits else byte_level
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def train_char_tokenizer(texts: Iterable[str], out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: one token per character of ASCII text."""
    return train_tokenizer(texts, len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet()), out_dir)


def tiny_config(
    vocab_size: int,
    *,
    model_type: str = "qwen3",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    tie_word_embeddings: bool = False,
):
    """A small config of a real `transformers` architecture (qwen2, qwen3, llama, ...)."""
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )


def kill_job(pid: int) -> list[int]:
    """SIGKILL to the process `pid` and every process under it, as the loss of the machine would:
    torchrun starts each worker in a session of its own, so a signal to the launcher's process
    group alone leaves the workers training on. Waits until the processes under `pid` are gone;
    `pid` itself the caller waits for, as its exit status is the caller's to read. Returns the pids
    it signalled."""
    launcher = psutil.Process(pid)
    job = [launcher, *launcher.children(recursive=True)]
    for process in job:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may have exited meanwhile
            process.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(job[1:], timeout=60)
    if alive:
        raise RuntimeError(f"processes {[p.pid for p in alive]} outlived SIGKILL")
    return [process.pid for process in job]
