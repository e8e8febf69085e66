"""Shared fixtures: a small LLaVA-1.5-shaped checkpoint built once per test session, and its model.

`small_model` is loaded once per session and shared by every test. A test that changes it (e.g.
``restore.apply``) must undo that in a ``finally`` with ``restore.remove(model)``, or use
`fresh_small_model`, which loads a private copy (about a second).
"""
from __future__ import annotations

import os

# Tests never reach the network: every model they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from llava_patches.loading import load_model  # noqa: E402
from llava_patches.loading import make_inputs as _make_inputs  # noqa: E402
from restore.small_checkpoint import build_small_checkpoint  # noqa: E402
from restore.small_checkpoint import synthetic_image as _synthetic_image  # noqa: E402

SMALL_CHECKPOINT_SEED = 0

# The small models are too small to gain from several threads, and on a shared machine
# OpenMP threads competing with other processes slow them down 5-20x. Override with
# RESTORE_TEST_THREADS=N.
torch.set_num_threads(int(os.environ.get("RESTORE_TEST_THREADS", "1")))


class LoadedModel(NamedTuple):
    tokenizer: Any
    model: torch.nn.Module
    image_processor: Any


def _load_small(path: Path) -> LoadedModel:
    tokenizer, model, image_processor, _ = load_model(path, device="cpu", dtype="float32")
    return LoadedModel(tokenizer, model, image_processor)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a small random LLaVA-1.5 checkpoint (seed 0), built once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return build_small_checkpoint(root / "llava-v1.5-small-random", seed=SMALL_CHECKPOINT_SEED)


@pytest.fixture(scope="session")
def small_model(small_checkpoint: Path) -> LoadedModel:
    """(tokenizer, model, image_processor): the small checkpoint on the CPU in fp32, eval mode, shared.

    Do not leave it modified: call restore.remove(model) in a finally, or use fresh_small_model.
    """
    return _load_small(small_checkpoint)


@pytest.fixture
def model(small_model):
    """The shared small model, given back stock (restore.remove) after the test."""
    import restore

    try:
        yield small_model.model
    finally:
        restore.remove(small_model.model)


@pytest.fixture
def fresh_small_model(small_checkpoint: Path) -> LoadedModel:
    """A private copy of the small model for tests that modify it."""
    return _load_small(small_checkpoint)


@pytest.fixture
def make_inputs():
    """make_inputs(tokenizer, image_processor, question, image, conv_mode="vicuna_v1", *, model_config=None)
    -> (input_ids [1, L], images [1, 3, 336, 336]), built like LLaVA's evaluation scripts."""
    return _make_inputs


@pytest.fixture
def synthetic_image():
    """synthetic_image(seed, size=(w, h)) -> a deterministic structured PIL RGB image."""
    return _synthetic_image


QUESTIONS = ["What is in the image?", "Is there a red circle?\nAnswer the question using a single word or phrase."]


@pytest.fixture
def prompts(small_model, synthetic_image):
    """[(input_ids [1, L], images [1, 3, 336, 336])] for the two QUESTIONS, each with its own image size."""
    tok, _, proc = small_model
    return [_make_inputs(tok, proc, q, synthetic_image(i, (400 + 60 * i, 300)), model_config=small_model.model.config)
            for i, q in enumerate(QUESTIONS)]
