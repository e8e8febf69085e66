"""--configs: several configurations in one pass give each configuration the answers file a separate run
writes (less LLaVA's random answer_id), with one model load and one vision encoding per batch.

In-process on the session's small model (fp32, CPU, greedy) and the benchmarks' fixtures, as
tests/test_batching.py runs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

import restore
from restore.eval import answer_files, arguments, runner
from restore.eval.naming import config_tag, spec_flags
from restore.settings import parse_run_tag
from restore.eval.fixtures import make_fixtures
from tests.test_batching import answers_of, bench_argv, run_entry

# Every kind of configuration: none, prune only, RESTORE, another base's settings, VisionZip's own row
# (keys and CLS feature), ToMe (its own encoding: never shared).
SWEEP = ["full", "HoloV-16", "HoloV-16-restore", "DivPrune-16-restore", "VisPruner-16-g0.75-anchors_uniform",
         "VisionZip-16", "ToMe-144"]


def tag_of(spec: str) -> str:
    """The canonical run name of a spec (its answers folder)."""
    return config_tag(**(parse_run_tag(spec) or {"base": None}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep-data")
    make_fixtures(root, n=5, seed=5, benchmarks=["gqa", "sqa", "ocrbench"])
    make_fixtures(root, n=2, seed=5, benchmarks=["mmbench"])
    return root


@pytest.fixture
def in_process(small_model, monkeypatch):
    """Entry points use the session's small model; counts model loads and images through the CLIP embeddings."""
    counts = {"loads": 0, "images_encoded": 0}

    def fake_load(args, base):
        counts["loads"] += 1
        model = runner.apply_reduction(small_model.model, args, base)
        return small_model.tokenizer, model, small_model.image_processor, "llava-small-test"

    clip = small_model.model.get_model().get_vision_tower().vision_tower.vision_model
    hook = clip.embeddings.register_forward_pre_hook(
        lambda module, inputs: counts.__setitem__("images_encoded", counts["images_encoded"] + inputs[0].shape[0]))
    monkeypatch.setattr(runner, "load_model_for_eval", fake_load)
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)
    try:
        yield counts
    finally:
        hook.remove()
        restore.remove(small_model.model)


def sweep(bench: str, data: Path, folder: Path, specs: List[str], *extra: str) -> int:
    entry, argv = bench_argv(bench, data, folder / "{config}" / "answers.jsonl", "--configs", ",".join(specs), *extra)
    return run_entry(entry, argv)


def separate(bench: str, data: Path, folder: Path, spec: str, *extra: str) -> Path:
    answers = folder / tag_of(spec) / "answers.jsonl"
    entry, argv = bench_argv(bench, data, answers, *spec_flags(spec), *extra)
    assert run_entry(entry, argv) == 0, spec
    return answers


def meta_of(path: Path) -> Dict:
    meta = answer_files.read_meta(str(path))
    return {k: v for k, v in meta.items()}


@pytest.mark.parametrize("bench,batch", [("gqa", 1), ("gqa", 4), ("sqa", 1), ("mmbench", 3), ("ocrbench", 1)])
def test_a_sweep_writes_what_separate_runs_write(bench, batch, data, tmp_path, in_process):
    extra = ["--batch-size", str(batch)]
    assert sweep(bench, data, tmp_path / "sweep", SWEEP, *extra) == 0
    sweep_counts = dict(in_process)
    for spec in SWEEP:
        alone = separate(bench, data, tmp_path / "separate", spec, *extra)
        swept = tmp_path / "sweep" / tag_of(spec) / "answers.jsonl"
        assert answers_of(swept) == answers_of(alone), spec
        assert meta_of(swept) == meta_of(alone), spec
    n_images = len(answers_of(swept))
    assert sweep_counts["loads"] == 1
    # the six configurations on the stock encoding share one; ToMe encodes on its own
    assert sweep_counts["images_encoded"] == 2 * n_images
    assert in_process["loads"] == 1 + len(SWEEP)
    assert in_process["images_encoded"] - sweep_counts["images_encoded"] == len(SWEEP) * n_images


def test_a_sweep_resumes_each_configuration_from_where_it_stopped(data, tmp_path, in_process, monkeypatch):
    specs = ["full", "HoloV-16-restore", "DivPrune-16"]
    # One configuration finished by a separate run, and a sweep killed in its third batch.
    separate("gqa", data, tmp_path / "sweep", "DivPrune-16")
    generate, calls = runner._generate, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(runner, "_generate", dying)
    with pytest.raises(KeyboardInterrupt):
        sweep("gqa", data, tmp_path / "sweep", specs)
    # batches 1 and 2: full and HoloV (DivPrune is done); batch 3: killed while full generates
    partial = {spec: len(answers_of(tmp_path / "sweep" / tag_of(spec) / "answers.jsonl")) for spec in specs}
    assert partial == {"full": 2, "HoloV-16-restore": 2, "DivPrune-16": 5}
    monkeypatch.setattr(runner, "_generate", generate)
    encoded = in_process["images_encoded"]
    assert sweep("gqa", data, tmp_path / "sweep", specs) == 0
    # the resume encodes the three unanswered images once, for full and HoloV together
    assert in_process["images_encoded"] - encoded == 3
    for spec in specs:
        alone = separate("gqa", data, tmp_path / "separate", spec)
        swept = tmp_path / "sweep" / tag_of(spec) / "answers.jsonl"
        assert answers_of(swept) == answers_of(alone), spec
        assert answer_files.read_meta(str(swept))["complete"]


@pytest.mark.parametrize("flags,message", [
    (["--configs", "full,HoloV-16", "--base", "HoloV"], "--base cannot be given with it"),
    (["--configs", "full,HoloV-16", "--restore"], "--restore cannot be given with it"),
    (["--configs", "full,HoloV-16", "--prune_ratio", "0.5"], "--prune_ratio cannot be given with it"),
    (["--configs", "HoloV-16-restore,holov-16-restore-g0.5"], "names one configuration twice"),
    (["--configs", "HoloV-16,Nope-16"], "unknown --base 'Nope'"),
    (["--configs", "HoloV-sixteen"], "expected 'full' or <base>-<n_vis>"),
    (["--configs", "full,,HoloV-16"], "without empty ones"),
    (["--configs", "HoloV-16-restore-g0.05"], "HoloV-16-restore-g0.05: reduction settings"),
])
def test_bad_configurations_are_refused_before_the_model_loads(flags, message, data, tmp_path, in_process, capsys):
    entry, argv = bench_argv("gqa", data, tmp_path / "{config}" / "a.jsonl", *flags)
    assert run_entry(entry, argv) == 2
    assert message in capsys.readouterr().err
    entry, argv = bench_argv("gqa", data, tmp_path / "{config}" / "a.jsonl", *flags, "--check-only")
    assert run_entry(entry, argv) == 2
    assert in_process["loads"] == 0 and not list(tmp_path.rglob("*.jsonl"))


def test_the_answers_file_must_name_each_configuration(data, tmp_path, in_process, capsys):
    entry, argv = bench_argv("gqa", data, tmp_path / "a.jsonl", "--configs", "full,HoloV-16")
    assert run_entry(entry, argv) == 2
    assert "--answers-file must contain {config}" in capsys.readouterr().err
    entry, argv = bench_argv("gqa", data, tmp_path / "{config}.jsonl")
    assert run_entry(entry, argv) == 2
    assert "no --configs was given" in capsys.readouterr().err


def test_shared_encoding_is_the_stock_encoding(small_model):
    """The memo gives back, for the stock tower and for the selectors, what each computes alone."""
    from llava_patches.vision import encode_visual_tokens, shared_vision_encoding

    model = small_model.model
    tower = model.get_model().get_vision_tower()
    pixels = torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    stock = tower(pixels)
    alone = encode_visual_tokens(model, pixels, with_keys=True, with_cls=True)
    with shared_vision_encoding(model) as memo:
        memo.encode(pixels)
        assert torch.equal(tower(pixels), stock)
        assert torch.equal(tower(pixels[1:]), stock[1:])
        some = encode_visual_tokens(model, pixels[[2, 0]], with_keys=True, with_cls=True)
        for name in ("features", "raw_features", "cls_attention", "keys", "cls_raw_feature"):
            assert torch.equal(getattr(some, name), getattr(alone, name)[[2, 0]]), name
        assert memo.images_encoded == 3
        other = torch.randn(1, 3, 336, 336)
        assert memo.lookup(other) is None  # an image it does not hold is encoded as usual
    assert type(tower).__name__ == "CLIPVisionTower" and not hasattr(tower, "_restore_encoding_memo")


def test_configurations_with_other_pixels_get_their_own(data, tmp_path, in_process, monkeypatch):
    """A family may preprocess differently for a reduced layout (LLaVA-NeXT's fixed grid): each
    configuration then sees its own pixels in a sweep, as in a separate run, and shares the encoding
    only with the configurations of its preprocessing."""
    from llava_patches.family import FAMILY

    preprocess, seen = FAMILY.preprocess_image, []

    def flipped_when_reduced(image, image_processor, model_config, settings=None):
        seen.append(settings is None)
        pixels = preprocess(image, image_processor, model_config)
        return pixels if settings is None else pixels.flip(-1)

    monkeypatch.setattr(FAMILY, "preprocess_image", flipped_when_reduced)
    monkeypatch.setattr(FAMILY, "preprocessing_key", lambda config, settings: settings is None, raising=False)
    specs = ["full", "HoloV-16", "DivPrune-16-restore"]
    assert sweep("gqa", data, tmp_path / "sweep", specs) == 0
    n_images = len(answers_of(tmp_path / "sweep" / "full" / "answers.jsonl"))
    assert seen.count(True) == seen.count(False) == n_images  # each image preprocessed once per key
    # full encodes alone; the two reduced configurations share the flipped pixels' encoding
    assert in_process["images_encoded"] == 2 * n_images
    for spec in specs:
        alone = separate("gqa", data, tmp_path / "separate", spec)
        swept = tmp_path / "sweep" / tag_of(spec) / "answers.jsonl"
        assert answers_of(swept) == answers_of(alone), spec
    # the flip reached the reduced configurations: without it their answers differ
    monkeypatch.setattr(FAMILY, "preprocess_image", preprocess)
    differs = False
    for spec in specs[1:]:
        plain = separate("gqa", data, tmp_path / "plain", spec)
        differs |= answers_of(plain) != answers_of(tmp_path / "sweep" / tag_of(spec) / "answers.jsonl")
    assert differs
