"""A budget given as a share of each image's visual tokens (``keep``, ``--keep``): its run name, its record,
and on LLaVA (every image 576 tokens) the count it is; the evaluation options LLaVA refuses."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import restore
from restore.eval import arguments, vqa_loader
from restore.eval.entry_point import SetupError, entry_by_name
from restore.eval.naming import plain_tag, recorded_tag, spec_flags
from restore.eval.fixtures import make_fixtures
from restore.results import config_of
from restore.settings import count_of_share, parse_run_tag, resolve_settings, run_tag


def test_share_names_read_back_and_differ_from_counts():
    share = resolve_settings("HoloV", None, True, 16384, keep=0.111)
    assert (share.n_vis, share.keep, run_tag(share)) == (16384, 0.111, "holov-k0.111-restore")
    assert resolve_settings("HoloV", None, True, 16384, keep=0.222) != share
    assert resolve_settings("HoloV", 16384, True, 16384) != share  # all tokens by count is another run
    g = resolve_settings("DivPrune", None, True, 16384, keep=0.333, prune_ratio=0.75)
    assert run_tag(g) == "divprune-k0.333-restore-g0.75"
    for tag in ("holov-k0.111-restore", "divprune-k0.333-restore-g0.75", "HoloV-K0.111"):
        config = parse_run_tag(tag)
        assert "n_vis" not in config
        again = resolve_settings(config.pop("base"), None, config.pop("restore"), 16384, **config)
        assert run_tag(again) == tag.lower()
    assert spec_flags("DivPrune-k0.111-restore") == ["--base", "DivPrune", "--keep", "0.111", "--restore"]
    assert plain_tag("DivPrune", None, True, 0.111) == "divprune-k0.111-restore"
    assert recorded_tag({"base": "DivPrune", "n_vis": None, "keep": 0.333, "restore": False}) == "divprune-k0.333"
    for bad in (0, 0.0, 1.5, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="share of each image's visual tokens"):
            resolve_settings("HoloV", None, False, 576, keep=bad)
    with pytest.raises(ValueError, match="not both"):
        resolve_settings("HoloV", 64, False, 576, keep=0.111)


def test_a_share_on_llava_is_the_count_it_is(small_model):
    assert [count_of_share(k, 576) for k in (0.333, 0.222, 0.111, 0.0001)] == [192, 128, 64, 1]
    model = small_model.model
    try:
        restore.apply(model, "HoloV", keep=0.111, restore=True)
        by_share = restore.settings_of(model)
        restore.apply(model, "HoloV", n_vis=64, restore=True)
        assert by_share == restore.settings_of(model) and by_share.keep is None
        with pytest.raises(ValueError, match="not both"):
            restore.apply(model, "HoloV", n_vis=64, keep=0.111)
        with pytest.raises(ValueError, match="keep=0.5 needs a base method"):
            restore.apply(model, None, keep=0.5)
    finally:
        restore.remove(model)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("share-data")
    make_fixtures(root, n=2, seed=0, benchmarks=["pope"])
    return root


def _checked(data: Path, *extra: str):
    entry = entry_by_name("vqa_loader")
    argv = ["--model-path", "unused-llava", "--question-file", str(data / "pope/llava_pope_test.jsonl"),
            "--image-folder", str(data / "pope/val2014"), "--answers-file", "/dev/null", "--device", "cpu", *extra]
    args = arguments.build_parser(entry).parse_args(argv)
    settings, _, _ = arguments.check_arguments(entry, args)
    return args, settings


def test_keep_flag_on_llava_records_the_count(data, monkeypatch):
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)  # LLaVA-1.5's 576 tokens
    args, settings = _checked(data, "--base", "HoloV", "--keep", "0.111", "--restore")
    assert (args.n_vis, args.keep, run_tag(args.reduction)) == (64, None, "holov-64-restore")
    assert settings["n_vis"] == 64 and "keep" not in settings
    assert "prompt_style" not in settings and "image_protocol" not in settings  # LLaVA's records as before
    for extra, message in ((["--base", "HoloV", "--keep", "0.111", "--n_vis", "64"], "not both"),
                           (["--keep", "0.111"], "--keep needs --base"),
                           (["--base", "HoloV", "--keep", "2"], "share of each image's visual tokens"),
                           (["--min-pixels", "3136", "--jpeg-quality", "75"], "--min-pixels, --jpeg-quality do not apply"),
                           (["--base", "HoloV"], "needs --n_vis (visual tokens to keep, 1..576) or --keep")):
        with pytest.raises(SetupError, match=re.escape(message)):
            _checked(data, *extra)


def test_lmms_eval_style_is_recorded_and_a_record_with_a_share_is_read(data, monkeypatch):
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)
    _, settings = _checked(data, "--prompt-style", "lmms_eval")
    assert settings["prompt_style"] == "lmms_eval"
    record = {"benchmark": "pope", "base": "DivPrune", "n_vis": None, "keep": 0.111, "restore": True,
              "model": "Qwen2.5-VL-7B-Instruct", "run_name": "divprune-k0.111-restore", "metrics": {}}
    config = config_of(record)
    assert (config.budget, config.variant, config.n_vis) == ("11.1%", "", 0)
    assert config_of({**record, "keep": None, "n_vis": 64, "run_name": "divprune-64-restore"}).budget == "64"


def test_keep_reaches_the_entry_point_and_its_answers_file(data, tmp_path, small_checkpoint):
    answers = tmp_path / "a.jsonl"
    argv = ["--model-path", str(small_checkpoint), "--question-file", str(data / "pope/llava_pope_test.jsonl"),
            "--image-folder", str(data / "pope/val2014"), "--answers-file", str(answers), "--device", "cpu",
            "--max_new_tokens", "2", "--base", "DivPrune", "--keep", "0.222"]
    assert vqa_loader.main(argv) == 0
    meta = json.loads((tmp_path / "a.jsonl.meta.json").read_text())
    assert (meta["settings"]["n_vis"], meta["settings"]["base"]) == (count_of_share(0.222, 576), "DivPrune")
