"""The benchmark registry: every built-in benchmark is one module with all its hooks, and a new
benchmark (Benchmark + scorer + fixture writer) is scored and written by the shared tools once registered."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from restore.eval import benchmarks, fixtures, scoring
from restore.eval.benchmarks import BENCHMARK_MODULES, Benchmark, benchmark_names, get_benchmark, register_benchmark
from restore.eval.scoring.common import make_result, match_answers, percent
from restore.jsonio import read_jsonl, write_jsonl


@pytest.fixture
def scratch_registry(monkeypatch):
    """Benchmarks registered inside a test disappear after it."""
    benchmarks._load_builtin()
    monkeypatch.setattr(benchmarks, "_REGISTRY", dict(benchmarks._REGISTRY))


def test_unknown_name_is_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown benchmark 'nope'; known: gqa, vqav2, "):
        get_benchmark("nope")


def test_a_second_benchmark_of_the_same_name_is_refused(scratch_registry):
    gqa = get_benchmark("gqa")
    assert register_benchmark(gqa) is gqa  # the same one again is harmless
    with pytest.raises(ValueError, match="registered already"):
        register_benchmark(dataclasses.replace(gqa, title="another GQA"))


@pytest.mark.parametrize("name", BENCHMARK_MODULES)
def test_builtin_benchmark_has_every_hook(name):
    benchmark = get_benchmark(name)
    assert benchmark.name == name and benchmark.title
    for hook in (benchmark.evaluate, benchmark.check_data, benchmark.write_fixture, benchmark.reference_answers):
        assert callable(hook) and hook.__module__ == f"restore.eval.benchmarks.{name}"
    assert benchmark.data_files and all(f.startswith(benchmark.folder + "/") for f in benchmark.data_files)
    assert benchmark.question_file.startswith(benchmark.folder + "/")


def test_builtin_order_is_the_registration_line():
    assert benchmark_names()[:len(BENCHMARK_MODULES)] == list(BENCHMARK_MODULES)
    assert scoring.BENCHMARKS == fixtures.BENCHMARKS == BENCHMARK_MODULES


def test_fixture_files_are_the_scorers_data_files(tmp_path):
    fixtures.make_fixtures(tmp_path, n=2)
    for name in BENCHMARK_MODULES:
        benchmark = get_benchmark(name)
        for relative in (benchmark.question_file, *benchmark.data_files):
            assert (tmp_path / relative).exists(), relative


# A benchmark of our own, in a few lines: yes/no questions on LLaVA's question-file format (so the
# vqa_loader entry point answers it), scored by exact match.

def _write_yesno(root: Path, n: int, rng: random.Random) -> dict:
    image = fixtures.save_image(fixtures.draw_scene(fixtures.random_scene(rng), rng), root / "yesno/images/0.png")
    questions = [{"question_id": i, "image": "0.png", "text": f"Is this picture {i}?\n{fixtures.SHORT_ANSWER}"}
                 for i in range(n)]
    write_jsonl(root / "yesno/questions.jsonl", questions)
    write_jsonl(root / "yesno/truth.jsonl", [{"question_id": i, "answer": "yes" if i % 2 else "no"} for i in range(n)])
    return {"first_image": image, "first_ids": list(range(n))}


def _evaluate_yesno(answers, data_root: Path, out_dir: Path, model_id: str):
    truth = {str(t["question_id"]): t["answer"] for t in read_jsonl(data_root / "yesno/truth.jsonl")}
    matched = match_answers(answers.records, lambda r: str(r["question_id"]), truth)
    correct = sum(r.get("text", "").strip().lower() == truth[qid] for qid, r in matched.by_key.items())
    return make_result("yesno", answers, matched, {"accuracy": percent(correct, len(truth))}, "accuracy", len(truth))


def _reference_yesno(data_root: Path, model_id: str = "reference") -> list:
    truth = {t["question_id"]: t["answer"] for t in read_jsonl(data_root / "yesno/truth.jsonl")}
    return [fixtures.reference_line(q["question_id"], q["text"], truth[q["question_id"]], model_id)
            for q in read_jsonl(data_root / "yesno/questions.jsonl")]


YESNO = Benchmark(name="yesno", title="Yes/no questions (a test benchmark).", entry="vqa_loader",
                  question_file="yesno/questions.jsonl", image_folder="yesno/images",
                  evaluate=_evaluate_yesno, data_files=("yesno/truth.jsonl",), write_fixture=_write_yesno,
                  reference_answers=_reference_yesno)


def test_a_registered_benchmark_is_written_and_scored_by_the_shared_tools(scratch_registry, tmp_path):
    register_benchmark(YESNO)
    manifest = fixtures.make_fixtures(tmp_path / "data", n=4, benchmarks=["yesno"])
    assert manifest["benchmarks"] == {"yesno": str(tmp_path / "data" / "yesno")}
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(line) + "\n" for line in [
        {"question_id": 0, "prompt": "p", "text": "No"},
        {"question_id": 1, "prompt": "p", "text": "yes"},
        {"question_id": 2, "prompt": "p", "text": "yes"},  # wrong; question 3 unanswered
    ]))
    summary = scoring.score("yesno", answers, tmp_path / "data", tmp_path / "out")
    assert summary["metrics"] == {"accuracy": 50.0} and summary["missing_ids"] == ["3"]
    assert json.loads((tmp_path / "out/metrics.json").read_text())["main_metric"] == "accuracy"
    scoring.check_data("yesno", tmp_path / "data")  # no check_data hook: nothing to check
    fixtures.write_reference_answers(tmp_path / "data", "yesno", tmp_path / "reference.jsonl")
    assert scoring.score("yesno", tmp_path / "reference.jsonl", tmp_path / "data", tmp_path / "ref")["metrics"] == {
        "accuracy": 100.0}
    # The entry point reads its question file like any LLaVA one.
    from restore.eval.vqa_loader import build_items

    items = build_items({"question_file": str(tmp_path / "data" / YESNO.question_file),
                         "image_folder": str(tmp_path / "data" / YESNO.image_folder)})
    assert [item.fields["question_id"] for item in items] == [0, 1, 2, 3]


def test_unregistered_or_scorerless_benchmark_cannot_be_scored(scratch_registry, tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'yesno'"):
        scoring.check_data("yesno", tmp_path)
    register_benchmark(dataclasses.replace(YESNO, evaluate=None))
    with pytest.raises(ValueError, match="unknown benchmark 'yesno'"):
        scoring.score("yesno", tmp_path / "a.jsonl", tmp_path, tmp_path)
