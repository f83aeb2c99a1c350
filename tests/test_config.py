"""Config loading, overrides and the up-front checks that fail before any model loads."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, SMOKE

from oprd.config import ConfigError, TrainConfig, load_config, read_run_config, to_dict, trained_differences
from oprd.models import ModelSpec, load_model_config, load_tokenizer
from oprd.preflight import check_model_pairing
from oprd.testing import tiny_config, train_tokenizer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_recipe_loads_and_overrides_apply():
    cfg = load_config(SMOKE / "oprd.yaml",
                      ["optim.lr=2e-4", "max_steps=7", "oprd.layers=[1, 3]", "eval.benchmarks=aime24,aime25"])
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.max_steps == 7
    assert cfg.oprd.layers == [1, 3]
    assert cfg.eval.benchmarks == ["aime24", "aime25"]
    # relative paths are read from the recipe's folder
    assert Path(cfg.student.model) == (SMOKE / "tiny-qwen3").resolve()
    assert Path(cfg.data.path) == (SMOKE / "prompts.parquet").resolve()


@pytest.mark.parametrize("recipe", sorted((RECIPES / "paper").glob("*.yaml"))
                         + sorted((RECIPES / "bridge").glob("*.yaml"))
                         + sorted((RECIPES / "applications").glob("*.yaml"))
                         + sorted(SMOKE.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(recipe, tmp_path):
    import yaml

    overrides = []
    if (yaml.safe_load(recipe.read_text()).get("bridge") or {}).get("path"):
        # a bridge recipe names the file `oprd bridge fit` writes: until it exists, it is refused
        with pytest.raises(ConfigError, match="no such file .*oprd bridge fit"):
            load_config(recipe)
        (tmp_path / "bridge.safetensors").write_bytes(b"")
        overrides = [f"bridge.path={tmp_path / 'bridge.safetensors'}"]
    cfg = load_config(recipe, overrides)
    assert cfg.uses_opd or cfg.uses_oprd


def test_paper_recipes_match_table_2_settings():
    cfg = load_config(RECIPES / "paper" / "oprd.yaml")
    assert cfg.student.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert cfg.max_steps == 500 and cfg.optim.lr == 1e-5 and cfg.optim.warmup_ratio == 0.03
    assert (cfg.rollout.prompts_per_step, cfg.rollout.responses_per_prompt) == (8, 2)
    assert cfg.rollout.max_new_tokens == 16384
    assert (cfg.oprd.layers, cfg.oprd.positions, cfg.oprd.k) == ("all", "last_k", 2000)
    assert load_config(RECIPES / "paper" / "opd_top16.yaml").opd.k == 16
    assert load_config(RECIPES / "paper" / "opd_top1_plus_oprd_mu10.yaml").oprd.coef == 10


PAPER_RECIPES = sorted((RECIPES / "paper").glob("*.yaml")) + sorted((RECIPES / "bridge").glob("*.yaml"))


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: p.name)
def test_paper_recipes_follow_the_reference_run_where_the_paper_is_silent(recipe, tmp_path):
    (tmp_path / "bridge.safetensors").write_bytes(b"")
    bridge = recipe.parent.name == "bridge"
    cfg = load_config(recipe, [f"bridge.path={tmp_path / 'bridge.safetensors'}"] if bridge else [])
    # the paper's own settings
    assert (cfg.max_steps, cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.schedule) == (500, 1e-5, 0.03, "cosine")
    assert (cfg.rollout.temperature, cfg.rollout.max_new_tokens, cfg.optim.precision) == (1.0, 16384, "bf16")
    assert (cfg.eval.samples, cfg.eval.temperature) == (16, 0.7)
    # the reference run's: its DAPO file in file order, a horizon of one epoch of it, no thinking, no effective
    # clipping, a float32 teacher, validation at top_p 0.95 and 15,360 tokens, the bridge at coefficient 10
    assert (cfg.data.path, cfg.data.shuffle, cfg.data.enable_thinking) == ("data/dapo-math-17k.parquet", False, False)
    assert cfg.data.max_prompt_tokens == 2048 and cfg.optim.schedule_steps == 17_917 // 8 == 2239
    assert (cfg.optim.grad_clip, cfg.optim.weight_decay, cfg.teacher.dtype) == (1000, 0.01, "float32")
    assert (cfg.eval.top_p, cfg.eval.max_new_tokens) == (0.95, 15360)
    assert cfg.eval.every == (50 if bridge else 20)
    if bridge:
        assert cfg.oprd.coef == 10 and cfg.oprd.normalize


def test_bridge_then_opd_is_one_recipe_of_two_stages(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"")
    cfg = load_config(RECIPES / "bridge" / "qwen3_4b_to_1.7b_bridge_then_opd_top1.yaml",
                      [f"bridge.path={tmp_path / 'b.safetensors'}"])
    assert (cfg.opd.objective, cfg.opd.start_step, cfg.oprd.stop_step, cfg.max_steps) == ("sampled", 250, 250, 500)
    assert cfg.bridge.path and cfg.oprd.normalize


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.warmup_ration=0.1"], "unknown config key optim.warmup_ration; did you mean optim.warmup_ratio"),
        (["optim.learning_rate=1"], "unknown config key optim.learning_rate; valid keys: lr, "),
        (["colour=blue"], "unknown config key colour"),
        (["max_steps=ten"], "max_steps must be int"),
        (["optim.lr=true"], "optim.lr must be float"),
        (["opd.objective=topq"], "opd.objective must be one of"),
        (["oprd.positions=middle"], "oprd.positions must be one of all, last, first_k, last_k; got 'middle'"),
        (["optim.precision=fp16"], "optim.precision must be one of auto, fp32, bf16; got 'fp16'"),
        (["oprd.layers=[0, 2]"], "oprd.layers as a list needs 1-based"),
        (["opd.objective=none", "oprd.coef=0"], "nothing to train"),
        (["rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["eval.top_p=0"], "eval.top_p must be in"),
        (["eval.samples=0"], "eval.samples must be >= 1"),
        (["eval_every=5"], "eval_every is now eval.every: write eval.every=5 on the command line, or in a recipe "
                           "`eval:` with `every: 5` under it"),
        (["a.b.c=1"], "nested too deeply"),
        (["optim.schedule_steps=0"], "optim.schedule_steps must be >= 1"),
        (["data.enable_thinking=false", "data.use_chat_template=false"], "data.enable_thinking=False is a chat-"),
        (["data.enable_thinking=maybe"], "data.enable_thinking must be bool or NoneType"),
        (["optim.schedule_steps=2"], "optim.schedule_steps=2 is below max_steps=3: the cosine decay reaches lr 0"),
        (["novalue"], "not of the form key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(SMOKE / "oprd.yaml", overrides)


def test_a_recipe_with_the_flat_eval_keys_is_told_their_section(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text((SMOKE / "oprd.yaml").read_text() + "eval_benchmarks: [aime24]\n")
    with pytest.raises(ConfigError, match=r"eval_benchmarks is now eval.benchmarks: write eval.benchmarks=\['aime"):
        load_config(recipe)


def test_a_run_folder_written_with_the_flat_eval_keys_reads_them_into_the_section(tmp_path):
    """A run recorded before the `eval` section resumes: its config.yaml moves them into it."""
    recorded = to_dict(load_config(SMOKE / "oprd.yaml", ["eval.every=3", "eval.samples=2"]))
    recorded.update({f"eval_{name}": value for name, value in recorded.pop("eval").items()})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    cfg = read_run_config(tmp_path / "config.yaml")
    assert (cfg.eval.every, cfg.eval.samples) == (3, 2)
    assert not trained_differences(cfg, load_config(SMOKE / "oprd.yaml", ["eval.every=3", "eval.samples=2"]))


def test_a_short_schedule_is_allowed_where_the_lr_never_reaches_zero():
    assert load_config(SMOKE / "oprd.yaml", ["optim.schedule_steps=2", "optim.schedule=constant"])
    assert load_config(SMOKE / "oprd.yaml", ["optim.schedule_steps=2", "optim.min_lr_ratio=0.1"])


def test_missing_models_and_data_are_reported():
    with pytest.raises(ConfigError, match="student.model is required"):
        load_config(None, ["teacher.model=x", "data.path=y", "oprd.coef=1"])


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other-tok")
    train_tokenizer(["completely different text " * 20, "more words here"], vocab_size=300, out_dir=folder)
    return load_tokenizer(ModelSpec(model=str(folder)))


def _pairing(cfg: TrainConfig, teacher_config=None, teacher_tok=None):
    spec = ModelSpec(model=str(SMOKE / "tiny-qwen3"))
    tok, config = load_tokenizer(spec), load_model_config(spec)
    return check_model_pairing(cfg, config, teacher_config or config, tok, teacher_tok or tok, cfg.bridge.path)


def test_pairing_accepts_same_models():
    assert _pairing(load_config(SMOKE / "oprd_plus_opd.yaml")) == []


def test_oprd_vanilla_refuses_different_widths():
    cfg = load_config(SMOKE / "oprd.yaml")
    wider = tiny_config(1024, hidden_size=96, num_heads=4)
    with pytest.raises(ConfigError, match="hidden size is 64 and the teacher's 96.*Bridge"):
        _pairing(cfg, teacher_config=wider)


def test_different_depth_pairs_layers_with_a_warning():
    deeper = tiny_config(1024, num_layers=6)
    warnings = _pairing(load_config(SMOKE / "oprd.yaml"), teacher_config=deeper)
    assert any("proportional map" in w for w in warnings)


def test_topk_larger_than_vocabulary_is_refused():
    with pytest.raises(ConfigError, match="opd.k=5000 is larger than the vocabulary"):
        _pairing(load_config(SMOKE / "opd_topk.yaml", ["opd.k=5000"]))


@pytest.mark.parametrize("recipe", ["opd_sampled.yaml", "oprd.yaml"])
def test_mismatched_tokenizers_are_refused(recipe, other_tokenizer):
    with pytest.raises(ConfigError, match="tokenizers differ.*OPRD-Bridge"):
        _pairing(load_config(SMOKE / recipe), teacher_tok=other_tokenizer)


def test_padded_teacher_embedding_is_accepted():
    """Same tokenizer, larger embedding (Qwen2.5 small vs large): logits are sliced, not refused."""
    padded = tiny_config(1024 + 64)
    assert _pairing(load_config(SMOKE / "opd_full.yaml"), teacher_config=padded) == []


def test_chat_template_difference_is_reported():
    spec = ModelSpec(model=str(SMOKE / "tiny-qwen3"))
    teacher_tok = load_tokenizer(spec)
    teacher_tok.chat_template = "{{ messages[0]['content'] }}"
    warnings = _pairing(load_config(SMOKE / "opd_sampled.yaml"), teacher_tok=teacher_tok)
    assert any("chat templates differ" in w for w in warnings)


def test_bridge_accepts_another_tokenizer_with_a_warning(other_tokenizer, tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"")
    cfg = load_config(SMOKE / "oprd.yaml", [f"bridge.path={tmp_path / 'b.safetensors'}"])
    warnings = _pairing(cfg, teacher_tok=other_tokenizer)
    assert any("re-reads each response's text" in w for w in warnings)


@pytest.mark.parametrize("overrides, message", [
    (["opd.start_step=20", "max_steps=20"], "leaves no step for OPD"),
    (["oprd.stop_step=5"], "oprd.stop_step is set but OPRD is off"),
])
def test_stage_schedule_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE / "opd_sampled.yaml", overrides)


def test_stage_gap_is_refused():
    with pytest.raises(ConfigError, match="steps 6..9 have no objective"):
        load_config(SMOKE / "oprd_plus_opd.yaml", ["max_steps=20", "oprd.stop_step=5", "opd.start_step=9"])
    load_config(SMOKE / "oprd_plus_opd.yaml", ["max_steps=20", "oprd.stop_step=5", "opd.start_step=5"])


def test_a_report_sink_that_is_not_installed_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"pip install 'oprd\[wandb\]'"):
        load_config(SMOKE / "oprd.yaml", ["report_to=wandb"])


def _documented_keys() -> set[str]:
    """The keys docs/config.md's table names: its first column's keys, and for a `section.*` row the
    sub-keys its third column lists (each item of the list opens with its key in backticks)."""
    keys = set()
    table = (ROOT / "docs" / "config.md").read_text().split("\n\n")[1]
    for row in table.splitlines()[2:]:
        named, _, meaning = row.strip().strip("|").split("|", 2)
        for key in re.findall(r"`([a-z_0-9.*]+)`", named):
            if key.endswith(".*"):
                section = key[:-2]
                # each listed key opens an item: "`k` (...)" at the start or after ", "
                keys |= {f"{section}.{sub}" for sub in re.findall(r"(?:^\s*|, )`([a-z_0-9]+)`", meaning)}
            else:
                keys.add(key)
    return keys


def _config_keys(cls=TrainConfig, prefix="") -> set[str]:
    keys = set()
    for name, kind in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(kind):
            keys |= _config_keys(kind, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_the_config_reference_names_every_key_and_no_other():
    documented, defined = _documented_keys(), _config_keys()
    assert documented - defined == set(), "docs/config.md names keys config.py does not have"
    assert defined - documented == set(), "config.py has keys docs/config.md does not name"


def test_a_config_built_in_code_is_held_to_the_same_choices():
    """Choices are `Literal` types: the loader checks them, and so does `validate` for a config a
    program builds with dataclasses.replace, with the same message."""
    from oprd.config import validate

    cfg = load_config(SMOKE / "oprd.yaml")
    with pytest.raises(ConfigError, match="opd.support must be one of student, teacher, intersection, union; got 'x'"):
        validate(dataclasses.replace(cfg, opd=dataclasses.replace(cfg.opd, support="x")))
    with pytest.raises(ConfigError, match=re.escape("oprd.layers must be one of last, all, even, odd (or list[int]); "
                                                  "got 'middle'")):
        load_config(SMOKE / "oprd.yaml", ["oprd.layers=middle"])
