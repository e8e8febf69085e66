"""The small random LLaVA-1.5 checkpoint: determinism, shapes, loadability, and outputs that depend on inputs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from restore import small_checkpoint as sc

WEIGHT_FILES = ("model.safetensors", f"{sc.VISION_SUBDIR}/model.safetensors", "tokenizer.model")


def _hashes(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in WEIGHT_FILES}


def _seed_of(path: Path) -> int:
    return json.loads((path / sc.MANIFEST_NAME).read_text())["seed"]


def test_same_seed_same_bytes_other_seed_other_weights(small_checkpoint, tmp_path, capsys):
    rng_before = torch.random.get_rng_state()
    again = sc.build_small_checkpoint(tmp_path / "llava-again", seed=_seed_of(small_checkpoint))
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building must not touch the global RNG"
    assert _hashes(again) == _hashes(small_checkpoint)

    # The CLI builds the other seed.
    assert sc.main(["--out", str(tmp_path / "llava-seed1"), "--seed", "1"]) == 0
    assert "built" in capsys.readouterr().out
    other = _hashes(tmp_path / "llava-seed1")
    reference = _hashes(small_checkpoint)
    assert other["model.safetensors"] != reference["model.safetensors"]
    assert other[f"{sc.VISION_SUBDIR}/model.safetensors"] != reference[f"{sc.VISION_SUBDIR}/model.safetensors"]


def test_config_is_llava_1_5_shaped(small_checkpoint):
    config = json.loads((small_checkpoint / "config.json").read_text())
    vision = json.loads((small_checkpoint / sc.VISION_SUBDIR / "config.json").read_text())
    processor = json.loads((small_checkpoint / sc.VISION_SUBDIR / "preprocessor_config.json").read_text())

    assert config["model_type"] == "llava_llama"
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 128
    assert config["max_position_embeddings"] == 4096
    assert config["rms_norm_eps"] == 1e-5
    assert config["use_cache"] is True

    vision_tower = Path(config["mm_vision_tower"])
    assert vision_tower.is_absolute() and vision_tower == small_checkpoint / sc.VISION_SUBDIR
    assert config["mm_hidden_size"] == vision["hidden_size"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == 576
    assert config["mm_vision_select_layer"] == -2
    assert config["mm_vision_select_feature"] == "patch"
    assert config["mm_projector_type"] == "mlp2x_gelu"
    assert config["image_aspect_ratio"] == "pad"
    assert config["mm_use_im_start_end"] is False and config["mm_use_im_patch_token"] is False
    assert config["mm_patch_merge_type"] == "flat"
    assert config["tokenizer_padding_side"] == "right"
    assert config["tokenizer_model_max_length"] == 2048

    assert processor["crop_size"] == {"height": 336, "width": 336}
    # transformers' own copy of OpenAI CLIP's statistics, not the builder's constants.
    assert processor["image_mean"] == pytest.approx(OPENAI_CLIP_MEAN)
    assert processor["image_std"] == pytest.approx(OPENAI_CLIP_STD)


def _bands(colors: list[tuple[int, int, int]], band: int, height: int) -> Image.Image:
    """Vertical bands of solid colour, ``band`` pixels wide each, left to right."""
    pixels = np.concatenate([np.full((height, band, 3), color, dtype=np.uint8) for color in colors], axis=1)
    return Image.fromarray(pixels)


def _clip_normalised(color: tuple[int, int, int]) -> torch.Tensor:
    """[3] what OpenAI CLIP preprocessing makes of one RGB colour, computed by hand."""
    return (torch.tensor(color, dtype=torch.float64) / 255 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)


def test_loaded_image_processor_preprocesses_like_clip(small_model):
    processor = small_model.image_processor

    def pixels(image: Image.Image) -> torch.Tensor:
        return processor.preprocess(image, return_tensors="pt")["pixel_values"][0].double()

    # A solid colour, larger than 336 on both sides: resized then cropped to 336 x 336, every pixel normalised.
    solid = pixels(_bands([(200, 100, 50)], 700, 500))
    assert solid.shape == (3, 336, 336)
    expected = _clip_normalised((200, 100, 50))[:, None, None].expand_as(solid)
    torch.testing.assert_close(solid, expected, atol=1e-5, rtol=0)
    # Already 336 tall, three bands of 336: the centre crop is exactly the middle band.
    banded = pixels(_bands([(255, 0, 0), (0, 255, 0), (0, 0, 255)], 336, 336))
    torch.testing.assert_close(banded, _clip_normalised((0, 255, 0))[:, None, None].expand_as(banded),
                               atol=1e-5, rtol=0)


def test_build_refuses_bad_targets(small_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="must contain 'llava'"):
        sc.build_small_checkpoint(tmp_path / "small-random")
    with pytest.raises(FileExistsError, match="overwrite"):
        sc.build_small_checkpoint(small_checkpoint)


def test_checkpoint_is_current_detects_moved_and_other_seed(small_checkpoint, tmp_path):
    assert sc.checkpoint_is_current(small_checkpoint, seed=_seed_of(small_checkpoint))
    assert not sc.checkpoint_is_current(small_checkpoint, seed=_seed_of(small_checkpoint) + 1)
    moved = tmp_path / "llava-moved"
    moved.mkdir()
    for name in ("config.json", sc.MANIFEST_NAME):
        (moved / name).write_bytes((small_checkpoint / name).read_bytes())
    assert not sc.checkpoint_is_current(moved, seed=_seed_of(small_checkpoint))


def test_tokenizer_is_llama_style(small_checkpoint):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token
    from transformers import AutoTokenizer, LlamaTokenizer

    from llava_patches.loading import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(small_checkpoint, use_fast=False)
    assert isinstance(tokenizer, LlamaTokenizer)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token == tokenizer.unk_token
    config = json.loads((small_checkpoint / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)

    question = (
        "Which object is on the left?\nA. dog\nB. cat\nC. 12 cars\nD. none\n"
        "Answer with the option's letter from the given choices directly."
    )
    ids = tokenizer_image_token(build_prompt(question), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").tolist()
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tokenizer.unk_token_id not in ids
    image_at = ids.index(IMAGE_TOKEN_INDEX)
    assert image_at == 35  # as with LLaVA-1.5's tokenizer; the official RESTORE code assumes it
    assert tokenizer.decode(ids[1:image_at]).startswith("A chat between a curious user")
    assert tokenizer.decode(ids[image_at + 1:]).strip().endswith("directly. ASSISTANT:")
    # Trained on the prompts, the common words are single pieces, not spelled out letter by letter.
    assert len(tokenizer("Answer the question using a single word or phrase.").input_ids) <= 12
    # Byte fallback: text outside the training corpus round-trips without <unk>.
    unusual = "Straße 漢字 ☃"
    unusual_ids = tokenizer(unusual).input_ids
    assert tokenizer.unk_token_id not in unusual_ids
    assert tokenizer.decode(unusual_ids, skip_special_tokens=True) == unusual


def test_loads_with_llava_builder(small_checkpoint):
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    path = str(small_checkpoint)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        path, None, get_model_name_from_path(path), device="cpu"
    )
    assert isinstance(model, LlavaLlamaForCausalLM)
    assert model.get_vision_tower().is_loaded
    assert model.get_vision_tower().num_patches == 576
    assert image_processor.crop_size == {"height": 336, "width": 336}
    assert context_len == 2048
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_every_parameter_comes_from_the_files_exactly(small_checkpoint, small_model):
    """No parameter is left randomly initialised, and fp16 storage makes the fp32 model exact."""
    model = small_model.model
    llm_state = load_file(small_checkpoint / "model.safetensors")
    vision_state = load_file(small_checkpoint / sc.VISION_SUBDIR / "model.safetensors")
    assert {t.dtype for t in (*llm_state.values(), *vision_state.values())} == {torch.float16}

    vision_prefix = "model.vision_tower.vision_tower."
    model_state = model.state_dict()
    assert set(llm_state) == {k for k in model_state if not k.startswith(vision_prefix)}
    assert set(vision_state) == {k[len(vision_prefix):] for k in model_state if k.startswith(vision_prefix)}
    for name, stored in llm_state.items():
        assert torch.equal(model_state[name], stored.float()), name
    for name, stored in vision_state.items():
        assert torch.equal(model_state[vision_prefix + name], stored.float()), name


def _cls_attention(model, images: torch.Tensor) -> torch.Tensor:
    """CLS->patch attention of the select layer, averaged over heads: [B, 576]."""
    clip = model.get_vision_tower().vision_tower
    with torch.no_grad():
        out = clip(images.to(model.dtype), output_attentions=True)
    return out.attentions[model.config.mm_vision_select_layer][:, :, 0, 1:].mean(dim=1)


def test_cls_attention_is_peaked_like_a_trained_clip(small_model, make_inputs, synthetic_image):
    tokenizer, model, image_processor = small_model
    images = torch.cat([
        make_inputs(tokenizer, image_processor, "What is this?", synthetic_image(seed), model_config=model.config)[1]
        for seed in range(4)
    ])
    attention = _cls_attention(model, images)
    assert attention.shape == (4, 576)
    ratio = attention.max(dim=1).values / attention.mean(dim=1)
    assert torch.all(ratio > 3) and torch.all(ratio < 30), ratio
    # Distinct images rank their patches differently.
    top = attention.topk(64, dim=1).indices
    assert len({tuple(sorted(row.tolist())) for row in top}) == 4


def _last_logits(model, input_ids, images, image_size) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids, images=images, image_sizes=[image_size]).logits[0, -1]


def test_generation_and_logits_depend_on_image_and_question(small_model, make_inputs, synthetic_image):
    tokenizer, model, image_processor = small_model
    image_a, image_b = synthetic_image(1), synthetic_image(2)
    question = "Is there a dog in the image? Answer the question using a single word or phrase."
    ids, images_a = make_inputs(tokenizer, image_processor, question, image_a, model_config=model.config)
    _, images_b = make_inputs(tokenizer, image_processor, question, image_b, model_config=model.config)
    other_ids, _ = make_inputs(tokenizer, image_processor, "How many cars are there?", image_a,
                               model_config=model.config)

    def generate(input_ids, images, image):
        with torch.inference_mode():
            out = model.generate(input_ids, images=images, image_sizes=[image.size], do_sample=False,
                                 max_new_tokens=8, use_cache=True)
        tokens = out[0].tolist()
        return tokens[1:] if tokens[0] == tokenizer.bos_token_id else tokens  # generate() echoes a leading <s>

    tokens_a, tokens_b = generate(ids, images_a, image_a), generate(ids, images_b, image_b)
    assert 1 <= len(tokens_a) <= 8 and 1 <= len(tokens_b) <= 8
    assert tokens_a != tokens_b

    logits_a = _last_logits(model, ids, images_a, image_a.size)
    logits_b = _last_logits(model, ids, images_b, image_b.size)
    logits_q = _last_logits(model, other_ids, images_a, image_a.size)
    spread = logits_a.std()
    # Far above float noise: with the usual 0.02 init the question changes the logits by only ~5% of
    # their spread, too little for tests to tell configurations apart.
    assert (logits_a - logits_b).abs().max() > 0.3 * spread
    assert (logits_a - logits_q).abs().max() > 0.3 * spread


def test_synthetic_image_is_deterministic_and_structured():
    first, again, other = sc.synthetic_image(3), sc.synthetic_image(3), sc.synthetic_image(4)
    assert first.mode == "RGB" and first.size == (400, 300)
    assert sc.synthetic_image(3, size=(120, 80)).size == (120, 80)
    pixels = np.asarray(first, dtype=np.float64)
    assert np.array_equal(pixels, np.asarray(again))
    assert not np.array_equal(pixels, np.asarray(other))
    # Structure, not noise: neighbouring pixels are far closer than random pairs.
    neighbour = np.abs(np.diff(pixels, axis=1)).mean()
    shuffled = np.random.default_rng(0).permutation(pixels.reshape(-1, 3))
    random_pairs = np.abs(np.diff(shuffled, axis=0)).mean()
    assert neighbour < 0.2 * random_pairs
    assert pixels.std() > 20


def test_demo_runs_on_the_small_checkpoint(small_checkpoint, capsys):
    from restore import demo

    assert demo.main(["--checkpoint", str(small_checkpoint), "--max-new-tokens", "3", "--image-seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "meaningless" in out
    assert "576 visual tokens" in out
    assert "[stock LLaVA]" in out and "tokens in" in out
