"""Sampling with vLLM, behind the same `Rollout` interface as `HFRollout`.

    rollout.backend=vllm rollout.vllm_mode=server rollout.vllm_url=http://HOST:8000   # a separate `vllm serve`
    rollout.backend=vllm rollout.vllm_mode=colocate                                   # vllm.LLM on the training GPU

What keeps sampling on-policy:
- The student's weights reach vLLM before the first rollout and after every optimizer step
  (`sync_weights`). A server with GPUs receives them over NCCL through vLLM's weight-transfer
  engine (`rollout.vllm_sync=nccl`, the server started with `--weight-transfer-config
  '{"backend": "nccl"}'`); otherwise they are written once to disk as safetensors and the server
  reloads them in place (`reload_weights`, which needs `VLLM_SERVER_DEV_MODE=1` on the server and
  the folder readable by it), written in the run's compute dtype. A colocated engine loads them in
  place, parameter by parameter, when it next wakes to sample.
- Every batch carries the weight version that sampled it, and the trainer refuses one sampled by
  stale weights.
- Sampling parameters are all explicit: temperature, top_p, top_k=-1, min_p=0, no penalties, max
  tokens, stop tokens = the student's EOS set, embedding rows beyond the tokenizer never sampled,
  and a seed per prompt drawn from torch's generator (so a resumed run draws the same seeds). Start
  the server with `--generation-config vllm` so the model's own generation_config adds nothing.
- The trainer recomputes every log-prob itself; vLLM's sampled log-probs travel on the batch only
  for diagnostics (`RolloutBatch.sampled_logprobs`).
- The first sync is checked: the server must encode a probe text as the student's tokenizer does,
  and after the sync its log-probs of a probe sequence must equal the student's, or the server is
  not serving a model of the student's architecture and tokenizer.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from oprd import distributed
from oprd.batch import RolloutBatch, pad_left
from oprd.distributed import ONE_PROCESS, World
from oprd.files import write_file_atomically
from oprd.models import eos_token_ids

PROBE_TEXT = "Compute 12 + 30, then check: the answer is \\boxed{42}."
PROBE_TOLERANCE = 1e-3  # |log p| between the server and the student after a sync (float32 on CPU agrees to 1e-6)
# A server computing in bf16 (or fp16) differs from the float32 student by that dtype's rounding, which
# depends on the model: the probe measures it on the student itself (its own forward in that dtype) and
# allows this many times it, for vLLM's kernels rounding otherwise than transformers'.
PROBE_ROUNDING_MARGIN = 4.0


class VLLMError(RuntimeError):
    """vLLM could not be reached or refused a request; the message says which and what to do."""


def require_vllm():
    """The vllm package, or an error naming the extra that installs it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError("rollout.backend=vllm with rollout.vllm_mode=colocate needs vLLM in this environment: "
                          "pip install -e '.[vllm]' (or use vllm_mode=server with a separately started server)"
                          ) from error
    return vllm


class Sampling:
    """The one place that turns sampling settings into vLLM's request fields, for a model whose
    responses end at `eos` and whose LM head has `rows` outputs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: list[int], rows: int):
        self.eos, self.pad = list(eos), tokenizer.pad_token_id
        # Embedding rows beyond the tokenizer are never sampled (HFRollout masks them the same way).
        self.never = {str(token): -100 for token in range(len(tokenizer), rows)}

    @classmethod
    def of(cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> Sampling:
        return cls(tokenizer, eos_token_ids(model, tokenizer), model.get_output_embeddings().weight.shape[0])

    @classmethod
    def of_folder(cls, folder: str, tokenizer: PreTrainedTokenizerBase) -> Sampling:
        """For a saved model read only from its config files (no weights are loaded here)."""
        from types import SimpleNamespace

        from transformers import AutoConfig, GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(folder)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation = None
        rows = AutoConfig.from_pretrained(folder).vocab_size
        return cls(tokenizer, eos_token_ids(SimpleNamespace(generation_config=generation), tokenizer), rows)

    def fields(self, params, seed: int) -> dict:
        return {
            "n": params.n, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p if params.temperature > 0 else 1.0, "top_k": -1, "min_p": 0.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "seed": seed,
            "stop_token_ids": self.eos, "ignore_eos": False, "skip_special_tokens": False,
            "include_stop_str_in_output": True, **({"logit_bias": self.never} if self.never else {}),
        }

    def batch(self, prompts: list[list[int]], samples: list[list[tuple[list[int], list[float], bool]]],
              version: int) -> RolloutBatch:
        """samples[i] = [(token ids, their log-probs, stopped by the token limit), ...] for prompt i."""
        rows = [(i, tokens, logprobs, cut) for i, group in enumerate(samples) for tokens, logprobs, cut in group]
        prompt_ids, prompt_mask = pad_left([prompts[i] for i, *_ in rows], self.pad)
        width = max(1, max(len(tokens) for _, tokens, _, _ in rows))
        response_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        response_mask = torch.zeros((len(rows), width), dtype=torch.long)
        sampled_logprobs = torch.zeros((len(rows), width))
        for row, (_, tokens, logprobs, _) in enumerate(rows):
            response_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            response_mask[row, : len(tokens)] = 1
            sampled_logprobs[row, : len(logprobs)] = torch.tensor(logprobs)
        return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask,
                            prompt_index=torch.tensor([i for i, *_ in rows]),
                            truncated=torch.tensor([cut for *_, cut in rows]), weight_version=version,
                            sampled_logprobs=sampled_logprobs)


def _seeds(count: int) -> list[int]:
    """One seed per prompt from torch's generator, which a run checkpoints: resumable, and distinct
    across processes (each seeds its generator with its rank)."""
    return torch.randint(2**31 - 1, (count,)).tolist()


# --------------------------------------------------------------------------- a separate server


class ServerRollout:
    """Samples through a separately started vLLM server (its OpenAI-compatible HTTP API)."""

    def __init__(self, url: str, sampling: Sampling, *, weights_dir: Path | None = None, sync: str = "disk",
                 world: World = ONE_PROCESS, timeout_s: float = 600.0, parallel_requests: int = 16,
                 sync_dtype: torch.dtype | None = None):
        self.url, self.sampling, self.world = url.rstrip("/"), sampling, world
        self.weights_dir, self.sync, self.timeout_s = weights_dir, sync, timeout_s
        self.sync_dtype = sync_dtype  # what the disk sync writes (the run's compute dtype); None: the weights'
        self.parallel_requests = parallel_requests
        self.weight_version = -1  # nothing of the run's student on the server yet
        self.served = self._get("/v1/models")["data"][0]["id"]
        self._nccl = None
        self._in_flight: list[Future] = []  # batches `submit` started: the weights stay until they are sampled

    # -- HTTP

    def _request(self, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            hint = (" (the server must run with VLLM_SERVER_DEV_MODE=1 for weight reloads)"
                    if path == "/collective_rpc" and error.code == 404 else "")
            raise VLLMError(f"the vLLM server at {self.url} refused {path}: HTTP {error.code} {detail}{hint}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise VLLMError(f"cannot reach a vLLM server at {self.url} ({error}): start one (docs/vllm.md) "
                            "or fix rollout.vllm_url") from None

    def _get(self, path: str) -> dict:
        return self._request(path)

    # -- sampling

    def generate(self, prompts: list[list[int]], params) -> RolloutBatch:
        return self.submit(prompts, params).result()

    def submit(self, prompts: list[list[int]], params) -> Future:
        """`generate` in the background: the seeds are drawn now and the batch is the current weight
        version's; `sync_weights` waits for it before the server's weights change."""
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        seeds, version = _seeds(len(prompts)), self.weight_version
        background = ThreadPoolExecutor(max_workers=1)
        future = background.submit(self._sample, prompts, params, seeds, version)
        background.shutdown(wait=False)
        self._in_flight = [f for f in self._in_flight if not f.done()] + [future]
        return future

    def _sample(self, prompts: list[list[int]], params, seeds: list[int], version: int) -> RolloutBatch:
        def one(i: int):
            reply = self._request("/v1/completions", {
                "model": self.served, "prompt": prompts[i], "logprobs": 0, "return_token_ids": True,
                **self.sampling.fields(params, seeds[i])})
            choices = sorted(reply["choices"], key=lambda choice: choice["index"])
            return [(choice["token_ids"], choice["logprobs"]["token_logprobs"], choice["finish_reason"] == "length")
                    for choice in choices]

        with ThreadPoolExecutor(max_workers=self.parallel_requests) as pool:
            samples = list(pool.map(one, range(len(prompts))))
        return self.sampling.batch(prompts, samples, version)

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """The server's log-probs of ids[1:] given the tokens before each (greedy, one new token)."""
        reply = self._request("/v1/completions", {"model": self.served, "prompt": ids, "max_tokens": 1,
                                                  "temperature": 0.0, "prompt_logprobs": 0})
        entries = reply["choices"][0]["prompt_logprobs"][1:]
        return [entry[str(token)]["logprob"] for entry, token in zip(entries, ids[1:])]

    # -- weights

    def load_folder(self, folder: Path, version: int = 0) -> None:
        """Has the server reload the weights of a saved model folder (one of its architecture). A
        tied model's head is named apart first, in links beside its weights (`head_named_apart`)."""
        folder = Path(folder).resolve()
        if _ties_head(folder):
            if self.weights_dir is None:
                raise ValueError("loading a model whose head is tied to its embedding needs a weights_dir")
            folder = head_named_apart(folder, self.weights_dir / "tied-head")
        self._reload(folder)
        self.weight_version = version

    def _reload(self, folder: Path) -> None:
        self._request("/collective_rpc", {"method": "reload_weights",
                                          "kwargs": {"weights_path": str(Path(folder).resolve())}})

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Gives the server the student's current weights (a collective under several processes:
        every process calls it), then records `version` as the one it samples from. A batch still
        being sampled is finished first, so no batch mixes two versions."""
        wait(self._in_flight)
        if self.sync == "nccl":
            self._push_nccl(model)
        else:
            write_weights_by_block(model, self.weights_dir, self.world, self.sync_dtype)
            if self.world.main:
                self._reload(self.weights_dir)
            self.world.barrier()
        self.weight_version = version

    def _push_nccl(self, model: torch.nn.Module) -> None:
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        if self._nccl is None:
            info = self.world.broadcast(self._request("/get_world_size") if self.world.main else None)
            host = urllib.parse.urlparse(self.url).hostname
            init = NCCLTrainerInitInfo(master_address=host, master_port=NCCL_PORT,
                                       world_size=1 + int(info.get("world_size", 1)), rank=self.world.rank)
            self._nccl = NCCLTrainerWeightTransferEngine.trainer_init(
                init, client=HTTPVLLMWeightSyncClient(self.url, timeout=self.timeout_s), source=ModuleSource(model))
        self._nccl.send_weights()

    def check_serves(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """After the first sync: the server tokenizes as the student does, and its log-probs of a
        probe sequence are the student's. Every process calls it; all raise together."""
        probe = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
        held_in_float32 = next(model.parameters()).dtype == torch.float32
        # every process: a sharded student runs its forward (and gathers its weights) together
        ours = student_logprobs(model, probe) if held_in_float32 else float32_logprobs(model, probe, self.world)
        tolerance, measured = PROBE_TOLERANCE, ""
        if self.sync_dtype not in (None, torch.float32):
            rounded = student_logprobs(model, probe, self.sync_dtype)
            rounding = max(abs(a - b) for a, b in zip(ours, rounded)) if self.world.main else 0.0
            tolerance = max(tolerance, PROBE_ROUNDING_MARGIN * rounding)
            measured = (f" ({PROBE_ROUNDING_MARGIN:g} x the {rounding:.3g} the student's own "
                        f"{str(self.sync_dtype).removeprefix('torch.')} forward differs by)")
        problem = self._mismatch(probe, ours, tolerance, measured) if self.world.main else None
        problem = self.world.broadcast(problem)
        if problem:
            raise VLLMError(problem)

    def _mismatch(self, probe: list[int], ours: list[float], tolerance: float, measured: str) -> str | None:
        served = self._request("/tokenize", {"model": self.served, "prompt": PROBE_TEXT,
                                             "add_special_tokens": False})["tokens"]
        if served != probe:
            return (f"the vLLM server at {self.url} serves {self.served!r}, whose tokenizer is not the student's: "
                    "start it from the student (or any checkpoint of its architecture and tokenizer)")
        gap = max(abs(a - b) for a, b in zip(ours, self.prompt_logprobs(probe)))
        if gap > tolerance:
            dtype = str(self.sync_dtype or torch.float32).removeprefix("torch.")
            return (f"after the weight sync, the vLLM server's log-probs differ from the student's by up to {gap:.3g}, "
                    f"more than the {tolerance:.3g} allowed a server computing in {dtype}, the run's compute dtype"
                    f"{measured}: the server's model {self.served!r} is not of the student's architecture, or it "
                    f"computes in a coarser dtype (start it with --dtype {dtype})")
        return None


NCCL_PORT = 51217  # where the trainer's NCCL endpoint for vLLM's weight transfer listens


BLOCK = re.compile(r"^(.*\.layers\.\d+)\.")  # the parameters of one transformer block


def write_weights_by_block(model: torch.nn.Module, folder: Path, world: World,
                           dtype: torch.dtype | None = None) -> None:
    """The student's weights as a sharded safetensors folder (HF's layout: one file per block, one
    for the rest, and model.safetensors.index.json), gathered and written one block at a time, so
    no process holds the whole model beside its own shard (at Qwen3-0.6B's shape a whole float32
    copy is 2.4 GB). In `dtype` where given: a bf16 server reads half the bytes of the float32
    master weights. Every process calls it (the gathers are collectives); the main one writes.
    A tied head is written under its own name too (see `_named_weights`)."""
    groups: dict[str, list[tuple[list[str], torch.nn.Parameter]]] = {}
    for names, parameter in _named_weights(model):
        match = BLOCK.match(names[0])
        groups.setdefault(match.group(1) if match else "rest", []).append((names, parameter))
    weight_map = {}
    for index, members in enumerate(groups.values(), 1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        state = {}
        for names, parameter in members:  # gathered once; a second name gets a copy (safetensors stores one each)
            tensor = distributed.full_value(parameter.detach()).to("cpu", dtype or parameter.dtype).contiguous()
            state |= {name: tensor.clone() if name != names[0] else tensor for name in names}
        if world.main:
            write_file_atomically(folder / file, lambda tmp, state=state: save_file(state, str(tmp),
                                                                                   metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(state, file))
        del state
    if world.main:
        for stale in set(folder.glob("*.safetensors")) - {folder / file for file in set(weight_map.values())}:
            stale.unlink()  # a folder written before by another layout
        write_file_atomically(folder / "model.safetensors.index.json",
                              lambda tmp: tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map})))
    # each block's gathered copy, safetensors' bytes of it and the update's freed pages go back before a
    # server on the same machine reads the new weights beside its old ones, its largest moment
    distributed.return_freed_memory()


def _ties_head(folder: Path) -> bool:
    return bool(json.loads((folder / "config.json").read_text()).get("tie_word_embeddings"))


def head_named_apart(folder: Path, into: Path) -> Path:
    """`into`: links to a tied model's weight files in `folder`, and one more file holding its
    embedding under the head's name, as `_named_weights` names it (the model's own folder is never
    written to). The names come from the architecture built empty from `folder`'s config."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    owners = dict(empty.named_parameters())
    head, embedding = next((name, owner) for name, parameter in empty.named_parameters(remove_duplicate=False)
                           for owner, held in owners.items() if held is parameter and name != owner)
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.iterdir():
        stale.unlink()
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        (into / file.name).symlink_to(file)
        with safe_open(file, "pt") as weights:
            if embedding in weights.keys():  # noqa: SIM118  (safe_open has no __contains__)
                found[head] = weights.get_tensor(embedding)
    if not found:
        raise ValueError(f"{folder} ties its head to {embedding}, which none of its safetensors files holds")
    save_file(found, str(into / "tied-head.safetensors"), metadata={"format": "pt"})
    return into


@torch.no_grad()
def student_logprobs(model: torch.nn.Module, ids: list[int], dtype: torch.dtype | None = None) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, from the student itself (under `dtype` autocast where given)."""
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    precision = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with distributed.gathered(model), precision:
        logits = model(input_ids=tokens).logits.float()
    return _next_token_logprobs(logits, tokens)


def _next_token_logprobs(logits_1_S_V: torch.Tensor, tokens_1_S: torch.Tensor) -> list[float]:
    """log p(tokens[t] | tokens[:t]) for t >= 1, from one sequence's float32 logits."""
    logprobs = torch.log_softmax(logits_1_S_V[0, :-1], dim=-1)
    return logprobs.gather(-1, tokens_1_S[0, 1:, None]).squeeze(-1).tolist()


def _model_class(model: torch.nn.Module) -> type[torch.nn.Module]:
    """The student's transformers class (e.g. Qwen3ForCausalLM), under FSDP2's wrapper class if sharded."""
    return next(cls for cls in type(model).__mro__ if not cls.__name__.startswith("FSDP"))


def float32_logprobs(model: torch.nn.Module, ids: list[int], world: World = ONE_PROCESS) -> list[float]:
    """`student_logprobs` in float32 for a student whose weights are held in a coarser dtype: its
    weights upcast (exactly) to float32 on the host, run through an empty copy of its architecture.
    A student held in bf16 computes in bf16 whatever autocast asks, so this is the only float32
    reference it has. A collective (a sharded student's weights are gathered); the main process's
    answer, an empty list elsewhere."""
    tensors = distributed.full_model_state(model)
    if not world.main:
        return []
    tensors |= {name: buffer.cpu() for name, buffer in model.named_buffers()}  # rotary tables: not in a state dict
    tensors = {name: value.float() if value.is_floating_point() else value for name, value in tensors.items()}
    with torch.device("meta"):
        empty = _model_class(model)(model.config)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        # a full state dict names a tied head and its embedding apart, with the same values
        logits = torch.func.functional_call(empty, tensors, (), {"input_ids": tokens}, tie_weights=False).logits.float()
    return _next_token_logprobs(logits, tokens)


# --------------------------------------------------------------------------- an engine on the training GPU


class ColocatedRollout:
    """vllm.LLM in this process, on the training GPU: it sleeps (weights and KV cache freed)
    between rollouts, so the update gets the memory back, and wakes with the new weights. vLLM's
    sleep mode exists on GPUs only: elsewhere (its CPU build) the engine stays awake, and every
    other step of the mode is the same."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, source: str,
                 gpu_memory_utilization: float, dtype: str, max_model_len: int, world: World = ONE_PROCESS):
        import os

        vllm = require_vllm()
        from vllm.platforms import current_platform

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # weights are handed over in this process
        self.world, self.tokenizer = world, tokenizer
        self.sampling = Sampling.of(model, tokenizer)
        self.sleeps = current_platform.is_sleep_mode_available()
        # Random weights at first ("dummy"): the first sync loads the student's before any rollout.
        self.llm = vllm.LLM(model=source, tokenizer=getattr(tokenizer, "name_or_path", None) or source, dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleeps,
                            max_model_len=max_model_len, generation_config="vllm", seed=0, load_format="dummy",
                            # the student's class: a config.json without `architectures` would otherwise be
                            # guessed a pooler, or served by vLLM's Transformers backend, which patches the
                            # student's own class in this process
                            hf_overrides={"architectures": [_model_class(model).__name__],
                                          "tie_word_embeddings": False})  # see _named_weights
        self._sleep()
        self.weight_version = -1
        self._pending: torch.nn.Module | None = None  # a student whose weights the engine has yet to load

    def _sleep(self) -> None:
        if self.sleeps:
            self.llm.sleep(level=1)

    def _wake_up(self, **tags) -> None:
        if self.sleeps:
            self.llm.wake_up(**tags)

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Loaded into the engine when it next wakes to sample, not now: waking the old weights
        only to overwrite them, sleeping, and waking again would move them three times a step.
        The live student's weights are version `version` until the next update, which follows the
        next rollout. A collective under several processes (each parameter is gathered whole), so
        every process samples as often as the others."""
        self._pending = model
        self.weight_version = version

    def _load_pending(self) -> None:
        if self._pending is not None:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _gathered_parameters(self._pending)})
            self._pending = None

    def generate(self, prompts: list[list[int]], params) -> RolloutBatch:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        seeds = _seeds(len(prompts))
        fields = [self.sampling.fields(params, seed) for seed in seeds]
        for request in fields:
            for key in ("ignore_eos", "include_stop_str_in_output"):
                request.pop(key)
            request["logit_bias"] = {int(k): v for k, v in request.pop("logit_bias", {}).items()} or None
            request["logprobs"] = 0
        self._wake_up()
        try:
            self._load_pending()
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                                        [VLLMSamplingParams(**request) for request in fields], use_tqdm=False)
        finally:
            self._sleep()
        samples = [[(list(o.token_ids), [next(iter(lp.values())).logprob for lp in (o.logprobs or [])],
                     o.finish_reason == "length") for o in output.outputs] for output in outputs]
        return self.sampling.batch(prompts, samples, self.weight_version)


def _gathered_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's parameters one at a time, each gathered whole (a collective under FSDP), so no
    full copy of the model is ever held beside the engine's."""
    for names, parameter in _named_weights(model):
        gathered = distributed.full_value(parameter.detach())  # once, under every name it is loaded by
        for name in names:
            yield name, gathered


def _named_weights(model: torch.nn.Module) -> list[tuple[list[str], torch.nn.Parameter]]:
    """Each parameter once, with every name an engine loads weights by: a tied head's name beside
    the embedding's. vLLM does not re-tie a tied head when weights are reloaded (its CPU build keeps
    the head it started with: measured, tests/test_vllm.py), so oprd's engines hold their own head
    (`tie_word_embeddings` off: the colocated engine, and a server started as docs/vllm.md says) and
    load it by that name."""
    named: dict[int, tuple[list[str], torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        named.setdefault(id(parameter), ([], parameter))[0].append(name)
    return list(named.values())
