"""Fixtures of the Qwen2.5-VL suite (run in .venv-qwen: make test-qwen): the small random checkpoint,
built once per session from its config, a few images of different sizes, and a batch of two questions
about them (the model restored to stock after each test)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers.models.qwen2_5_vl", reason="the Qwen2.5-VL suite runs in .venv-qwen (make test-qwen)")


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory):
    from qwen_patches.small_checkpoint import build

    return build(tmp_path_factory.mktemp("qwen") / "qwen2.5-vl-small-random", seed=0)


@pytest.fixture(scope="session")
def qwen_loaded(qwen_checkpoint):
    from qwen_patches.family import FAMILY

    torch.manual_seed(0)
    return FAMILY.load(str(qwen_checkpoint), device="cpu", dtype="fp32")


def make_image(height: int, width: int, seed: int):
    from PIL import Image

    rng = np.random.RandomState(seed)
    # smooth structure plus noise, so that neighbouring patches are alike as in a photo
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / (7 + seed)), np.cos(y / (5 + seed)), np.sin((x + y) / 11)], axis=-1)
    pixels = (127 + 100 * base + rng.randn(height, width, 3) * 20).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def images():
    # 112 x 168 px -> 8 x 12 patches -> 24 visual tokens; 140 x 112 -> 10 x 8 -> 20 tokens
    return [make_image(112, 168, 0), make_image(140, 112, 1)]


QUESTIONS = ["What is in the picture?", "Please describe the image briefly."]


@pytest.fixture()
def model(qwen_loaded):
    import restore

    yield qwen_loaded.model
    restore.remove(qwen_loaded.model)


@pytest.fixture(scope="module")
def batch(qwen_loaded, images):
    from qwen_patches.inputs import build_inputs

    tokenizer, model, image_processor, _ = qwen_loaded
    return build_inputs(tokenizer, image_processor, model.config, QUESTIONS, images)


def alone(qwen_loaded, images, b):
    """The inputs of question b with image b on its own."""
    from qwen_patches.inputs import build_inputs

    tokenizer, model, image_processor, _ = qwen_loaded
    return build_inputs(tokenizer, image_processor, model.config, [QUESTIONS[b]], [images[b]])
