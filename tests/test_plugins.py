"""A new method is one file: found in tokenreduction/, named with --plugin, or installed as an entry point;
and every command-line flag means one thing (no argparse prefix matching), in the scripts and in Python.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tokenreduction
from restore.eval import arguments, entry_point, runner, vqa_loader
from restore.eval.fixtures import make_fixtures
from tests.test_eval_scripts import run_script, script_env
from tokenreduction import registry

REPO = Path(__file__).resolve().parents[1]

# A selector that keeps the first n tokens: simple enough that a wrong answer would be obvious.
METHOD_SOURCE = textwrap.dedent('''
    import torch
    from tokenreduction import register_selector

    @register_selector("{name}")
    def keep_first(tokens, n_keep):
        return torch.arange(n_keep).expand(tokens.batch_size, n_keep)
''')


def write_method(folder: Path, module: str, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    path.write_text(METHOD_SOURCE.format(name=name))
    return path


@pytest.fixture
def clean_registry(monkeypatch):
    """The registry and sys.modules as they were, after a test that registers methods."""
    tokenreduction.available_selectors()  # the built-in methods stay registered
    monkeypatch.setattr(registry, "_SELECTORS", dict(registry._SELECTORS))
    monkeypatch.setattr(registry, "_NAMES", dict(registry._NAMES))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


# --------------------------------------------------------------------------------------------------
# Finding methods


def test_a_new_file_in_the_package_is_a_method_without_any_other_edit(tmp_path, monkeypatch, clean_registry):
    # the package folder, plus a second folder standing in for the new file: the repository stays untouched
    write_method(tmp_path, "keepfirst_in_package", "KeepFirstInPackage")
    monkeypatch.setattr(tokenreduction, "__path__", [*tokenreduction.__path__, str(tmp_path)])
    monkeypatch.setitem(registry._discovery, "done", False)
    assert "KeepFirstInPackage" in tokenreduction.available_selectors()
    assert tokenreduction.canonical_name("keepfirstinpackage") == "KeepFirstInPackage"
    assert sys.modules["tokenreduction.keepfirst_in_package"].__file__ == str(tmp_path / "keepfirst_in_package.py")


def test_plugins_are_imported_and_bad_ones_named(tmp_path, monkeypatch, clean_registry):
    write_method(tmp_path, "lab_method", "LabMethod")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(entry_point.SetupError, match="unknown --base 'LabMethod'"):
        arguments.validate_reduction("LabMethod", 8, False)
    arguments.load_plugins(["lab_method"])
    assert arguments.validate_reduction("labmethod", 8, False) == "LabMethod"
    with pytest.raises(entry_point.SetupError, match=r"cannot import the plugin module 'no_such_lab_module'.*PYTHONPATH"):
        arguments.load_plugins(["no_such_lab_module"])
    with pytest.raises(entry_point.SetupError, match="name the module, e.g. mylab.my_method, not its file"):
        arguments.load_plugins(["lab_method.py"])


def test_installed_entry_points_register_methods_and_a_broken_one_is_named(tmp_path):
    site = tmp_path / "site"
    write_method(site, "installed_method", "InstalledMethod")
    dist = site / "lab_methods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{tokenreduction.ENTRY_POINT_GROUP}]\ninstalled = installed_method\n")
    code = "import tokenreduction as tr; print(tr.available_selectors())"
    env = {**script_env(), "PYTHONPATH": f"{site}:{REPO}"}
    listed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "InstalledMethod" in listed.stdout and "HoloV" in listed.stdout

    (dist / "entry_points.txt").write_text(f"[{tokenreduction.ENTRY_POINT_GROUP}]\nbroken = not_there_module\n")
    broken = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0
    assert "entry point broken = not_there_module (from the installed package lab-methods)" in broken.stderr
    assert "fix or uninstall" in broken.stderr


# --------------------------------------------------------------------------------------------------
# No prefix matching


PARSER_MAINS = {  # module -> argv that builds every parser (and subparser) it has, then asks for --help
    "restore.eval.vqa_loader": ["--help"], "restore.eval.mmbench": ["--help"], "restore.eval.science": ["--help"],
    "restore.eval.ocrbench": ["--help"], "restore.eval.shards": ["--help"], "restore.eval.scoring.__main__": ["--help"],
    "restore.eval.fixtures": ["--help"], "restore.report": ["--help"], "restore.bench": ["--help"],
    "restore.analyze": ["--help"], "restore.demo": ["--help"], "restore.small_checkpoint": ["--help"],
}


@pytest.mark.parametrize("module", sorted(PARSER_MAINS))
def test_no_parser_matches_flag_prefixes(module, monkeypatch, capsys):
    built = []
    original_init = argparse.ArgumentParser.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", recording_init)
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(PARSER_MAINS[module])
    assert done.value.code == 0
    assert built and [p.prog for p in built if p.allow_abbrev] == []


def test_an_abbreviated_flag_is_refused_by_the_entry_point(tmp_path, capsys):
    argv = ["--question-file", "q", "--answers-file", str(tmp_path / "a.jsonl"), "--base", "HoloV", "--n_vis", "8"]
    for abbreviated in (["--rest"], ["--n_v", "16"], ["--overw"]):
        with pytest.raises(SystemExit) as refused:
            vqa_loader.main([*argv, *abbreviated])
        assert refused.value.code == 2
        assert f"unrecognized arguments: {' '.join(abbreviated)}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The scripts


@pytest.fixture(scope="module")
def script_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin-data")
    make_fixtures(root, n=3, seed=0)
    return root


def test_scripts_refuse_unknown_and_abbreviated_flags_before_any_shard(script_data, small_checkpoint, tmp_path):
    for flags, refused in [(["--base", "HoloV", "--n_vis", "16", "--rest"], "unrecognized arguments: --rest"),
                           (["--base", "HoloV", "--n_v", "128"], "unrecognized arguments: --n_v 128"),
                           (["--run", "x"], "unrecognized arguments: --run x"),
                           (["--base", "LabMethod", "--n_vis", "8"], "unknown --base 'LabMethod'")]:
        run = run_script("gqa", small_checkpoint, script_data, tmp_path, *flags)
        assert run.returncode == 2, run.stdout + run.stderr
        assert refused in run.stderr
        assert not (tmp_path / "answers").exists()  # no shard started, no answers folder named after it


def test_scripts_refuse_an_empty_question_file_before_any_shard(script_data, small_checkpoint, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(script_data / "gqa", data / "gqa")  # the scorer's files too: only the questions are gone
    (data / "gqa/llava_gqa_testdev_balanced.jsonl").write_text("")
    (tmp_path / "out").mkdir()
    run = run_script("gqa", small_checkpoint, data, tmp_path / "out")
    assert run.returncode == 2
    assert "holds no questions" in run.stderr
    assert not (tmp_path / "out/answers").exists() and not (tmp_path / "out/results").exists()


def test_a_plugin_method_runs_in_a_script_and_is_recorded(script_data, small_checkpoint, tmp_path):
    plugins = tmp_path / "plugins"
    write_method(plugins / "lab", "keep_first", "KeepFirst")
    (plugins / "lab/__init__.py").write_text("")
    run = run_script("gqa", small_checkpoint, script_data, tmp_path, "--plugin", "lab.keep_first",
                     "--base", "KeepFirst", "--n_vis", "8", PYTHONPATH=str(plugins))
    assert run.returncode == 0, run.stdout + run.stderr
    answers_dir = tmp_path / "answers/gqa" / small_checkpoint.name / "keepfirst-8"
    metas = sorted((answers_dir / "chunks").glob("*.meta.json"))
    assert metas
    for meta in metas:
        settings = json.loads(meta.read_text())["settings"]
        assert (settings["base"], settings["n_vis"], settings["plugins"]) == ("KeepFirst", 8, ["lab.keep_first"])
    questions = [json.loads(line) for line in (script_data / "gqa/llava_gqa_testdev_balanced.jsonl").read_text().splitlines()]
    merged = [json.loads(line) for line in (answers_dir / "merge.jsonl").read_text().splitlines()]
    assert [line["question_id"] for line in merged] == [q["question_id"] for q in questions]
    assert list((tmp_path / "results").glob("*.json"))


def test_a_resume_with_other_plugins_is_refused(tmp_path, monkeypatch, capsys, small_model, small_checkpoint,
                                               clean_registry):
    import restore

    data = tmp_path / "data"
    make_fixtures(data, n=2, seed=0)
    write_method(tmp_path / "plugins", "resume_method", "ResumeMethod")
    write_method(tmp_path / "plugins", "other_method", "OtherMethod")
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)
    monkeypatch.setattr(runner, "load_model_for_eval", lambda args, base: (
        small_model.tokenizer, restore.apply(small_model.model, base=base, n_vis=args.n_vis), small_model.image_processor,
        "llava-small-test"))
    build = runner.image_preprocessing_for_check
    monkeypatch.setattr(runner, "image_preprocessing_for_check", lambda path, settings=None: build(str(small_checkpoint), settings))
    answers = tmp_path / "a.jsonl"
    argv = ["--model-path", "x", "--question-file", str(data / "gqa/llava_gqa_testdev_balanced.jsonl"),
            "--image-folder", str(data / "gqa/data/images"), "--answers-file", str(answers), "--device", "cpu",
            "--max_new_tokens", "2", "--base", "ResumeMethod", "--n_vis", "8"]
    try:
        assert vqa_loader.main([*argv, "--plugin", "resume_method"]) == 0
        capsys.readouterr()
        assert vqa_loader.main([*argv, "--plugin", "resume_method", "--plugin", "other_method"]) == 2
        assert "plugins: ['resume_method'] -> ['resume_method', 'other_method']" in capsys.readouterr().err
    finally:
        restore.remove(small_model.model)
