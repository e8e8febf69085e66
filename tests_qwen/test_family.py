"""The Qwen2.5-VL family in the registry of the Qwen environment, its checkpoint builder, its refusals."""
from __future__ import annotations

import hashlib
import json
import importlib.util

import pytest
import torch

import restore
from restore import families
from qwen_patches.family import FAMILY, max_visual_tokens
from qwen_patches.inputs import expand_image_tokens, visual_tokens_of_grid


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
    generation = json.loads((qwen_checkpoint / "generation_config.json").read_text())
    assert generation["do_sample"] and generation["repetition_penalty"] == 1.05  # greedy runs must override it


def test_greedy_answers_keep_the_checkpoints_repetition_penalty(qwen_loaded):
    """The runner's greedy call (do_sample=False and nothing else) is generate with the checkpoint's penalty."""
    from PIL import Image

    from qwen_patches.inputs import build_inputs

    tokenizer, model = qwen_loaded.tokenizer, qwen_loaded.model
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    batch = build_inputs(tokenizer, qwen_loaded.image_processor, model.config, ["Say it."], [image])
    images = FAMILY.batch_images([FAMILY.preprocess_image(image, qwen_loaded.image_processor, model.config)],
                                 "cpu", torch.float32)
    prompt = FAMILY.prompt_ids(tokenizer, "Say it.", True, "qwen2_5_vl", model.config)
    with torch.inference_mode():
        runner_like = FAMILY.generate(model, tokenizer, [prompt], images, [image.size], do_sample=False,
                                      max_new_tokens=12)
        penalised = model.generate(**batch, do_sample=False, max_new_tokens=12, repetition_penalty=1.05)
    assert torch.equal(runner_like, penalised[:, batch["input_ids"].shape[1]:])


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


def test_auto_precision_is_the_familys_own(monkeypatch):
    """What --dtype auto records is what the Qwen family loads: bfloat16 on CUDA (LLaVA's is float16)."""
    from restore.eval.arguments import resolve_execution

    assert resolve_execution("auto", "auto", FAMILY) == ("cpu", "float32")
    assert resolve_execution("cpu", "bfloat16", FAMILY) == ("cpu", "bfloat16")
    from restore.eval.entry_point import SetupError

    if not torch.cuda.is_available():
        with pytest.raises(SetupError, match="CUDA is not available"):
            resolve_execution("cuda", "auto", FAMILY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_execution("auto", "auto", FAMILY) == ("cuda", "bfloat16")


def test_the_evaluation_pixel_range(qwen_checkpoint, qwen_loaded):
    from PIL import Image

    from qwen_patches.inputs import build_inputs
    from qwen_patches.loading import load_image_processor

    assert FAMILY.image_protocol() == {"min_pixels": 200704, "max_pixels": 12845056, "jpeg_quality": 75}
    assert FAMILY.image_protocol(3136, None, 0) == {"min_pixels": 3136, "max_pixels": 12845056, "jpeg_quality": 0}
    for low, high in ((100, None), (5000, 4000), (None, 700)):
        with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
            FAMILY.image_protocol(low, high)
    with pytest.raises(ValueError, match="JPEG quality is 1..95"):
        FAMILY.image_protocol(jpeg_quality=100)
    own = load_image_processor(str(qwen_checkpoint))
    protocol = load_image_processor(str(qwen_checkpoint), FAMILY.image_protocol())
    image = Image.new("RGB", (112, 84), (10, 200, 30))  # 9408 px: below the protocol's 200704
    counts = []
    for processor in (own, protocol):
        batch = build_inputs(qwen_loaded.tokenizer, processor, qwen_loaded.model.config, ["q"], [image])
        grid = batch["image_grid_thw"][0]
        counts.append(visual_tokens_of_grid(grid))
    assert counts[0] == 12 and counts[1] >= 256  # enlarged to the protocol's smallest area, aspect kept


def test_the_evaluation_images_are_jpeg_round_trips(qwen_checkpoint):
    """lmms-eval hands Qwen each image as a JPEG: the protocol's pixels are those of the re-encoded image."""
    from PIL import Image

    from qwen_patches.loading import jpeg_round_trip, load_image_processor

    generator = torch.Generator().manual_seed(0)
    noise = (torch.rand(96, 128, 3, generator=generator) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(noise, "RGB")
    plain = load_image_processor(str(qwen_checkpoint), FAMILY.image_protocol(3136, None, 0))
    jpeg = load_image_processor(str(qwen_checkpoint), FAMILY.image_protocol(3136, None, 75))
    assert plain.merge_size == jpeg.merge_size == 2  # every other attribute is the processor's
    got = FAMILY.preprocess_image(image, jpeg, None)[0]
    assert torch.equal(got, FAMILY.preprocess_image(jpeg_round_trip(image, 75), plain, None)[0])
    assert not torch.equal(got, FAMILY.preprocess_image(image, plain, None)[0])
    assert jpeg_round_trip(image, 0) is image


def test_the_image_check_preprocesses_as_the_protocol_does(qwen_checkpoint, images):
    from qwen_patches.loading import load_image_processor
    from restore.eval.runner import image_preprocessing_for_check

    protocol = FAMILY.image_protocol()
    checked = image_preprocessing_for_check(str(qwen_checkpoint), None, image_protocol=protocol)(images[0])
    inferred = FAMILY.preprocess_image(images[0], load_image_processor(str(qwen_checkpoint), protocol), None)
    assert all(torch.equal(a, b) for a, b in zip(checked, inferred))
    own = image_preprocessing_for_check(str(qwen_checkpoint))(images[0])
    assert own[1].tolist() != checked[1].tolist()  # 24 tokens as the checkpoint's processor, >= 256 as the protocol
