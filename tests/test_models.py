"""Loading models: a teacher cut to the blocks OPRD reads, from a whole causal LM checkpoint."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from oprd.models import ModelSpec, load_model
from oprd.testing import tiny_config


def saved_model(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(64, num_layers=3))
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_a_cut_backbone_holds_the_checkpoint_blocks_and_prints_no_load_report(tmp_path, capfd):
    model, path = saved_model(tmp_path)
    backbone = load_model(ModelSpec(model=str(path)), torch.device("cpu"), dtype=torch.float32, up_to_layer=2)
    assert len(backbone.layers) == 2
    whole = model.state_dict()
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, whole[f"model.{name}"])
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out  # the left-out head and block are meant to be left out


def test_a_cut_backbone_whose_checkpoint_lacks_a_kept_weight_is_an_error(tmp_path):
    _, path = saved_model(tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.weight"):
        load_model(ModelSpec(model=str(path)), torch.device("cpu"), dtype=torch.float32, up_to_layer=2)
