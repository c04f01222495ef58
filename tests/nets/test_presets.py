"""Presets: exact parameter counts of the real Wan2.1 models (built on meta), overrides, errors."""

import pytest
import torch

from sfplus.nets.presets import PRESETS, build_dit, get_config


@pytest.mark.parametrize(
    "name,params,keys",
    [
        ("wan2.1-t2v-1.3b", 1_418_996_800, 825),
        ("wan2.1-t2v-14b", 14_288_491_584, 1_095),
        ("wan2.1-i2v-14b-480p", 16_394_878_784, 1_303),
    ],
)
def test_real_presets_parameter_counts_on_meta(name, params, keys):
    with torch.device("meta"):
        model = build_dit(name)
    assert model.num_parameters() == params
    assert len(model.state_dict()) == keys
    assert next(model.parameters()).is_meta
    assert model.config.head_dim == 128


def test_small_presets_build_and_run():
    assert {"tiny", "tiny-i2v", "toy"} <= set(PRESETS)
    toy = build_dit("toy")
    assert toy.config.in_dim == toy.config.out_dim == 3
    out = toy(torch.randn(1, 3, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 32))
    assert out.shape == (1, 3, 2, 4, 4)


def test_overrides_and_errors():
    model = build_dit("tiny", num_layers=1, text_len=4)
    assert len(model.blocks) == 1 and model.config.text_len == 4
    assert PRESETS["tiny"].num_layers == 2  # presets are not mutated
    with pytest.raises(ValueError, match="known: .*wan2.1-t2v-1.3b"):
        build_dit("wan2.2-5b")
    with pytest.raises(ValueError, match="unknown WanConfig field"):
        get_config("tiny", layers=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        build_dit("tiny", num_heads=3)
