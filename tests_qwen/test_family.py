"""The Qwen2.5-VL family in the registry of the Qwen environment, its checkpoint builder, its refusals."""
from __future__ import annotations

import importlib.util

import hashlib

import pytest
import torch

import restore
from restore import families
from qwen_patches.family import FAMILY, expand_image_tokens, max_visual_tokens


def test_registry_finds_qwen_and_skips_llava(qwen_checkpoint, qwen_loaded):
    assert FAMILY in families.families()
    assert families.family_of_checkpoint(str(qwen_checkpoint)) is FAMILY
    assert families.family_of_model(qwen_loaded.model) is FAMILY
    if importlib.util.find_spec("llava") is None:  # .venv-qwen installs no llava: the LLaVA family is skipped, and says why
        assert "llava" in families.unavailable_families()
        assert "llava" not in [f.name for f in families.families()]


def test_checkpoint_is_deterministic_and_shaped_like_qwen(qwen_checkpoint, tmp_path):
    from qwen_patches.small_checkpoint import build

    again = build(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert hashlib.sha256((again / name).read_bytes()).digest() == \
            hashlib.sha256((qwen_checkpoint / name).read_bytes()).digest(), name
    config = FAMILY.check_checkpoint(str(qwen_checkpoint))
    text, vision = config["text_config"], config["vision_config"]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (14, 2, 2)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    section = text["rope_scaling"]["mrope_section"]
    assert [2 * s / head_dim for s in section] == [0.25, 0.375, 0.375]  # as Qwen2.5-VL-7B's [16, 24, 24] / 128
    assert text["rope_theta"] == 1e6


def test_expand_image_tokens():
    assert expand_image_tokens([1, 9, 2, 9, 3], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9, 3]
    with pytest.raises(ValueError, match="2 image placeholders for 1 images"):
        expand_image_tokens([9, 9], 9, [1])


def test_unimplemented_bases_are_refused(qwen_loaded):
    model = qwen_loaded.model
    for base in ("VisionZip", "ToMe"):
        with pytest.raises(ValueError, match="not implemented yet"):
            restore.apply(model, base=base, n_vis=8)
    assert not restore.is_applied(model)
    assert max_visual_tokens(model.config) == 16384
    with pytest.raises(TypeError, match="Qwen2_5_VLForConditionalGeneration"):
        families.family_of_model(torch.nn.Linear(2, 2))
