"""The small random LLaVA-NeXT checkpoint: determinism, llava-v1.6 config, stock loading and generation,
and the visual-token count of stock llava-torch's anyres path against docs/llava_next.md's formula."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from restore import small_next_checkpoint as snc
from restore.small_checkpoint import VISION_SUBDIR, synthetic_image

WEIGHT_FILES = ("model.safetensors", f"{VISION_SUBDIR}/model.safetensors", "tokenizer.model",
                f"{VISION_SUBDIR}/preprocessor_config.json")

# (width, height) -> (grid columns, grid rows) that llava-v1.6's pinpoints give. Covers every grid,
# both unpadding axes, an image smaller than a crop, an exact fit (no unpadding) and a tie broken
# by candidate order (a square image that fits 1x2 and 2x1 equally picks the first, 1x2).
IMAGES: dict[tuple[int, int], tuple[int, int]] = {
    (640, 480): (2, 2),    # COCO-like 4:3: 2340 tokens
    (300, 400): (1, 2),    # portrait 3:4, yet the 1x2 grid is taller still: padded above and below
    (1000, 250): (3, 1),   # wide
    (200, 900): (1, 3),    # tall, padded left and right
    (100, 100): (1, 2),    # smaller than a crop: least waste, first of the tied candidates
    (672, 672): (2, 2),    # exact fit: nothing unpadded, 576 + 48 * 49 = 2928
    (600, 320): (2, 1),    # narrower than 2:1, padded left and right; odd padding (3 columns) keeps 46
}


class Loaded(NamedTuple):
    tokenizer: Any
    model: torch.nn.Module
    image_processor: Any


def _hashes(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in WEIGHT_FILES}


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return snc.build_small_next_checkpoint(tmp_path_factory.mktemp("next") / "llava-v1.6-small-random", seed=0)


@pytest.fixture(scope="module")
def next_model(next_checkpoint: Path) -> Loaded:
    """Loaded by LLaVA's own builder (which always loads float16), then made float32 for the CPU."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(next_checkpoint), None, get_model_name_from_path(str(next_checkpoint)), device="cpu")
    model = model.float().eval()
    return Loaded(tokenizer, model, image_processor)


def _prompt_ids(tokenizer, question: str = "What is shown in the image?") -> torch.Tensor:
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["vicuna_v1"].copy()  # llava-v1.6-vicuna-7b's template
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]


def test_same_seed_same_bytes_other_seed_other_weights(next_checkpoint, tmp_path, capsys):
    rng_before = torch.random.get_rng_state()
    again = snc.build_small_next_checkpoint(tmp_path / "llava-v1.6-again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building must not touch the global RNG"
    assert _hashes(again) == _hashes(next_checkpoint)
    config, config_again = (json.loads((p / "config.json").read_text()) for p in (next_checkpoint, again))
    config.pop("mm_vision_tower"), config_again.pop("mm_vision_tower")  # absolute paths differ
    assert config == config_again

    assert snc.main(["--out", str(tmp_path / "llava-v1.6-seed1"), "--seed", "1"]) == 0
    assert "built" in capsys.readouterr().out
    other = load_file(str(tmp_path / "llava-v1.6-seed1" / "model.safetensors"))
    reference = load_file(str(next_checkpoint / "model.safetensors"))
    assert not torch.equal(other["model.image_newline"], reference["model.image_newline"])
    assert not torch.equal(other["lm_head.weight"], reference["lm_head.weight"])


def test_folder_name_must_say_llava_and_v1_6(tmp_path, capsys):
    with pytest.raises(ValueError, match="v1.6"):
        snc.build_small_next_checkpoint(tmp_path / "llava-v1.5-small-random")
    assert snc.main(["--out", str(tmp_path / "small-v1.6")]) == 2
    assert "must contain" in capsys.readouterr().err


def test_config_is_llava_v1_6_shaped(next_checkpoint):
    config = json.loads((next_checkpoint / "config.json").read_text())
    vision = json.loads((next_checkpoint / VISION_SUBDIR / "config.json").read_text())
    weights = load_file(str(next_checkpoint / "model.safetensors"))

    assert config["image_aspect_ratio"] == "anyres"
    assert config["mm_patch_merge_type"] == "spatial_unpad"
    assert config["image_grid_pinpoints"] == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert config["tokenizer_model_max_length"] == 4096  # a 2x2 image alone is 2928 tokens
    assert config["mm_vision_select_layer"] == -2 and config["mm_vision_select_feature"] == "patch"
    assert (vision["image_size"], vision["patch_size"]) == (336, 14)
    assert weights["model.image_newline"].shape == (config["hidden_size"],)
    assert snc.next_checkpoint_is_current(next_checkpoint, seed=0)
    assert not snc.next_checkpoint_is_current(next_checkpoint, seed=1)


def test_builder_loads_the_newline_from_the_checkpoint(next_model, next_checkpoint):
    # A missing key would leave LLaVA's torch.empty() placeholder, i.e. garbage, without an error.
    stored = load_file(str(next_checkpoint / "model.safetensors"))["model.image_newline"].float()
    assert torch.equal(next_model.model.get_model().image_newline.detach(), stored)
    assert next_model.model.get_vision_tower().is_loaded


@pytest.mark.parametrize("size", list(IMAGES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_token_count_and_layout_match_the_formula(next_model, size):
    tokenizer, model, processor = next_model
    from llava.mm_utils import process_images

    image = synthetic_image(sum(size), size)
    cols, rows = IMAGES[size]
    assert snc.best_grid_resolution(size, snc.NEXT_GRID_PINPOINTS) == (336 * cols, 336 * rows)
    pixels = process_images([image], processor, model.config)
    assert tuple(pixels.shape) == (1, 1 + cols * rows, 3, 336, 336)  # base view + crops

    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        embeds = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixels,
                                                            image_sizes=[image.size])[4]
    n_visual = embeds.shape[1] - (ids.shape[1] - 1)  # the <image> placeholder is replaced
    assert n_visual == snc.next_visual_token_count(size)

    # Layout: 576 base tokens, then the unpadded grid row by row, each row closed by image_newline.
    kept_rows, kept_cols = snc.unpadded_grid_shape(size, 24 * rows, 24 * cols)
    start = int((ids[0] < 0).nonzero()[0, 0])
    visual = embeds[0, start:start + n_visual]
    is_newline = (visual == model.get_model().image_newline).all(dim=-1)
    expected = torch.zeros(n_visual, dtype=torch.bool)
    expected[576 + kept_cols::kept_cols + 1] = True
    assert torch.equal(is_newline, expected)
    assert int(is_newline.sum()) == kept_rows


def test_formula_facts_from_docs():
    # The papers' 2880 is the 2x2 grid before unpadding and without newline tokens.
    assert snc.next_visual_token_count((640, 480), unpad=False, newline=False) == 2880
    assert snc.next_visual_token_count((640, 480)) == 576 + 36 * 49 == 2340
    assert snc.next_visual_token_count((672, 672)) == 576 + 48 * 49 == 2928
    assert snc.next_visual_token_count((300, 400), unpad=False, newline=False) == 3 * 576
    # Unpadding keeps the image's own extent in patches: 200 x 900 on a 72 x 24 grid spans 16 columns,
    # 640 x 480 on 48 x 48 spans 36 rows.
    assert snc.unpadded_grid_shape((200, 900), 72, 24) == (72, 16)
    assert snc.unpadded_grid_shape((640, 480), 48, 48) == (36, 48)


def test_stock_generate_with_image_sizes(next_model):
    tokenizer, model, processor = next_model
    from llava.mm_utils import process_images

    ids = _prompt_ids(tokenizer)
    outputs = []
    for size in [(640, 480), (300, 400), (1000, 250)]:
        image = synthetic_image(7, size)
        pixels = process_images([image], processor, model.config)
        with torch.inference_mode():
            out = model.generate(ids, images=pixels, image_sizes=[image.size], do_sample=False,
                                 max_new_tokens=4, use_cache=True)
        assert out.shape[0] == 1 and 1 <= out.shape[1] <= 5
        outputs.append(out)
    # The same inputs generate the same tokens: no uninitialised tensor takes part.
    image = synthetic_image(7, (640, 480))
    with torch.inference_mode():
        again = model.generate(ids, images=process_images([image], processor, model.config),
                               image_sizes=[image.size], do_sample=False, max_new_tokens=4, use_cache=True)
    assert torch.equal(again, outputs[0])


def test_batch_of_mixed_grids_counts_each_image(next_model):
    """Two images with different crop counts: process_images returns a list; each sample's length holds."""
    tokenizer, model, processor = next_model
    from llava.mm_utils import process_images

    sizes = [(640, 480), (200, 900)]
    images = [synthetic_image(i, s) for i, s in enumerate(sizes)]
    pixels = process_images(images, processor, model.config)
    assert isinstance(pixels, list) and [p.shape[0] for p in pixels] == [5, 4]
    ids = _prompt_ids(tokenizer).repeat(2, 1)
    with torch.no_grad():
        _, _, mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            ids, None, torch.ones_like(ids), None, None, pixels, image_sizes=[im.size for im in images])
    lengths = mask.sum(dim=1).tolist()
    assert lengths == [ids.shape[1] - 1 + snc.next_visual_token_count(s) for s in sizes]


def test_shares_every_other_tensor_with_the_1_5_small_checkpoint(next_checkpoint, small_checkpoint):
    """Documented: for one seed only image_newline is new, so 1.5 and NeXT runs differ by the path alone."""
    for name in ("model.safetensors", f"{VISION_SUBDIR}/model.safetensors"):
        next_weights = load_file(str(next_checkpoint / name))
        v15_weights = load_file(str(small_checkpoint / name))
        extra = {"model.image_newline"} if name == "model.safetensors" else set()
        assert set(next_weights) == set(v15_weights) | extra
        assert all(torch.equal(next_weights[k], v15_weights[k]) for k in v15_weights)
