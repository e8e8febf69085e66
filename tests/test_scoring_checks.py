"""Scorers refuse data files that do not define the benchmark's item set (before inference, through
check_data), refuse answer files that match nothing, fail --strict on any unclean run, and never
leave a half-written output file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest

from restore.eval.fixtures import make_fixtures, reference_answers
from restore.eval.scoring import AnswersError, DataError, check_data, score
from restore.eval.scoring.__main__ import main as cli


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_fixtures(root, n=4, seed=3)
    return root


@pytest.fixture
def data_root(pristine, tmp_path) -> Path:
    """A private copy of the fixtures that a test may damage."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(pristine, root, ignore=shutil.ignore_patterns("*.jpg", "*.png"))
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def edit_jsonl(path: Path, change: Callable[[list[dict]], list[dict]]) -> None:
    write_jsonl(path, change(read_jsonl(path)))


def edit_json(path: Path, change: Callable) -> None:
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(change(obj) or obj))


# --------------------------------------------------------------------------------------------
# POPE: exactly the three splits, each label line the label of its question


def test_pope_missing_split_is_refused(data_root):
    (data_root / "pope/coco/coco_pope_popular.json").unlink()
    with pytest.raises(DataError, match="coco_pope_popular.json"):
        check_data("pope", data_root)


def test_pope_extra_label_file_is_refused(data_root):
    (data_root / "pope/coco/coco_pope_extra.json").write_text((data_root / "pope/coco/coco_pope_random.json").read_text())
    with pytest.raises(DataError, match="coco_pope_extra.json"):
        check_data("pope", data_root)


def test_pope_more_labels_than_questions_names_the_first_unpaired_line(data_root):
    # POPE's current release: its random split has more items than LLaVA's question file asks.
    labels = data_root / "pope/coco/coco_pope_random.json"
    edit_jsonl(labels, lambda rows: rows + [dict(rows[0], question_id=len(rows) + 1)])
    with pytest.raises(DataError, match=r"5 label lines but .* 4 random questions \(label line 5 has no question\)"):
        check_data("pope", data_root)


def test_pope_label_text_mismatch_names_the_line(data_root):
    edit_jsonl(data_root / "pope/coco/coco_pope_adversarial.json",
               lambda rows: rows[:2] + [dict(rows[2], text="Is there a giraffe in the image?")] + rows[3:])
    with pytest.raises(DataError, match="coco_pope_adversarial.json line 3 .*giraffe"):
        check_data("pope", data_root)


def test_pope_label_image_mismatch_is_refused(data_root):
    edit_jsonl(data_root / "pope/coco/coco_pope_popular.json",
               lambda rows: [dict(rows[0], image="COCO_val2014_000000000001.jpg")] + rows[1:])
    with pytest.raises(DataError, match="coco_pope_popular.json line 1 "):
        check_data("pope", data_root)


def test_pope_check_data_cli_refuses_mismatch_before_inference(data_root, capsys):
    edit_jsonl(data_root / "pope/coco/coco_pope_random.json", lambda rows: rows[:-1])
    assert cli(["pope", "--data-root", str(data_root), "--check-data"]) == 2
    assert "coco_pope_random.json has 3 label lines" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The same audit for every other scorer: one mismatch each, found by check_data


def _drop_first_line(path: Path) -> None:
    edit_jsonl(path, lambda rows: rows[1:])


def _gqa_extra_question(root: Path) -> None:
    edit_jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl", lambda rows: rows + [dict(rows[0], question_id="999")])


def _vqav2_dev_not_in_full(root: Path) -> None:
    edit_jsonl(root / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", lambda rows: rows + [dict(rows[0], question_id=7)])


def _seed_other_release(root: Path) -> None:
    def rename(annotation):
        annotation["questions"][0]["question"] = "Which release is this?"
    edit_json(root / "seed_bench/SEED-Bench.json", rename)


def _mmbench_answer_outside_options(root: Path) -> None:
    path = root / "mmbench/mmbench_dev_20230712.tsv"
    header, first, *rest = path.read_text().split("\n")
    cells = first.split("\t")
    cells[header.split("\t").index("answer")] = "E"
    path.write_text("\n".join([header, "\t".join(cells), *rest]))


def _mmbench_repeated_index(root: Path) -> None:
    path = root / "mmbench/mmbench_dev_20230712.tsv"
    header, first, *rest = path.read_text().rstrip("\n").split("\n")
    path.write_text("\n".join([header, first, first, *rest]) + "\n")


def _mme_question_without_truth(root: Path) -> None:
    edit_jsonl(root / "MME/llava_mme.jsonl",
               lambda rows: [dict(rows[0], text="Is this question in the release?\nAnswer the question using a "
                                                "single word or phrase.")] + rows[1:])


def _mme_subtask_absent(root: Path) -> None:
    import shutil

    edit_jsonl(root / "MME/llava_mme.jsonl", lambda rows: [r for r in rows if r["category"] != "OCR"])
    shutil.rmtree(root / "MME/MME_Benchmark_release_version/OCR")


def _mme_release_question_not_asked(root: Path) -> None:
    edit_jsonl(root / "MME/llava_mme.jsonl", lambda rows: rows[1:])


def _sqa_problem_not_asked(root: Path) -> None:
    edit_json(root / "scienceqa/llava_test_CQM-A.json", lambda items: items[1:])


def _sqa_image_flag_differs(root: Path) -> None:
    def drop_image(items):
        next(item for item in items if "image" in item).pop("image")
    edit_json(root / "scienceqa/llava_test_CQM-A.json", drop_image)


def _textvqa_unknown_question(root: Path) -> None:
    edit_jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl",
               lambda rows: [dict(rows[0], text="what colour is the sky?\n" + rows[0]["text"].split("\n", 1)[1])]
               + rows[1:])


def _ocrbench_repeated_item(root: Path) -> None:
    edit_json(root / "ocrbench/OCRBench.json", lambda items: items + [items[0]])


def _ocrbench_unknown_type(root: Path) -> None:
    def retype(items):
        items[0]["type"] = "Captioning"
    edit_json(root / "ocrbench/OCRBench.json", retype)


MISMATCHES = [
    ("gqa", _gqa_extra_question, r"llava_gqa_testdev_balanced.jsonl line 5: question 999 is not a balanced question"),
    ("gqa", lambda r: _drop_first_line(r / "gqa/llava_gqa_testdev_balanced.jsonl"), "4 balanced questions, .* 3"),
    ("vqav2", _vqav2_dev_not_in_full, r"test-dev2015.jsonl line 5: question 7 is not in"),
    ("seed", _seed_other_release, "llava-seed-bench.jsonl line 1: .* has another question text"),
    ("seed", lambda r: _drop_first_line(r / "seed_bench/llava-seed-bench.jsonl"), "is not asked"),
    ("mmbench", _mmbench_answer_outside_options, "row 1 .*answer 'E' is not one of its options"),
    ("mmbench", _mmbench_repeated_index, "row 2 repeats index"),
    ("mme", _mme_question_without_truth, "has no ground truth"),
    ("mme", _mme_subtask_absent, "no question of the MME subtask.* OCR"),
    ("mme", _mme_release_question_not_asked, "1 questions of MME_Benchmark_release_version are not in"),
    ("sqa", _sqa_problem_not_asked, "is not asked"),
    ("sqa", _sqa_image_flag_differs, "lacks an image, problems.json says the opposite"),
    ("textvqa", _textvqa_unknown_question, "line 1: .*what colour is the sky"),
    ("textvqa", lambda r: _drop_first_line(r / "textvqa/llava_textvqa_val_v051_ocr.jsonl"), "are not in"),
    ("ocrbench", _ocrbench_repeated_item, "item 5 repeats"),
    ("ocrbench", _ocrbench_unknown_type, "'Captioning' is not an OCRBench question type"),
]


@pytest.mark.parametrize("bench, damage, message", MISMATCHES, ids=[f"{b}-{d.__name__}" for b, d, _ in MISMATCHES])
def test_data_mismatch_is_refused_by_check_data_and_score(data_root, tmp_path, bench, damage, message):
    answers = tmp_path / "answers.jsonl"
    write_jsonl(answers, reference_answers(data_root, bench))  # before the damage: a plausible run
    check_data(bench, data_root)
    damage(data_root)
    with pytest.raises(DataError, match=message):
        check_data(bench, data_root)
    with pytest.raises(DataError, match=message):
        score(bench, answers, data_root, tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_broken_data_file_is_a_data_error_naming_it(data_root):
    path = data_root / "gqa/data/testdev_balanced_questions.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(DataError, match="testdev_balanced_questions.json is not valid JSON"):
        check_data("gqa", data_root)


def test_mme_missing_ground_truth_found_by_check_data(data_root, capsys):
    txt = next((data_root / "MME/MME_Benchmark_release_version/code_reasoning").glob("*.txt"))
    txt.unlink()
    assert cli(["mme", "--data-root", str(data_root), "--check-data"]) == 2
    assert "has no ground truth" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Answers that match nothing, and --strict


def score_cli(bench: str, answers: Path, data_root: Path, out: Path, *extra: str) -> int:
    return cli([bench, "--answers", str(answers), "--data-root", str(data_root), "--out-dir", str(out), *extra])


def test_no_matching_answer_is_an_error_not_zero(pristine, tmp_path, capsys):
    answers = tmp_path / "a.jsonl"
    write_jsonl(answers, [dict(r, question_id=f"other-{i}") for i, r in enumerate(reference_answers(pristine, "gqa"))])
    with pytest.raises(AnswersError, match="none of the 4 answers"):
        score("gqa", answers, pristine, tmp_path / "out")
    assert score_cli("gqa", answers, pristine, tmp_path / "out") == 4
    assert score_cli("gqa", answers, pristine, tmp_path / "out", "--strict") == 4
    assert "wrong answer file, benchmark or --data-root" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_empty_answer_file_is_an_error(pristine, tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.write_text("")
    assert score_cli("pope", answers, pristine, tmp_path / "out") == 4


def _with_unexpected(rows):
    return rows + [dict(rows[0], question_id="not-a-question")]


def _with_duplicate(rows):
    return rows + [rows[0]]


def _with_missing(rows):
    return rows[1:]


@pytest.mark.parametrize("spoil, problem", [
    (_with_unexpected, "1 answers match no item of the benchmark, e.g. not-a-question"),
    (_with_duplicate, "1 items were answered more than once"),
    (_with_missing, "1 expected items have no answer"),
    (None, "1 answer-file lines are not valid JSON objects, e.g. 5"),
])
def test_strict_fails_on_any_unclean_run(pristine, tmp_path, capsys, spoil, problem):
    rows = reference_answers(pristine, "gqa")
    answers = tmp_path / "a.jsonl"
    if spoil is None:
        answers.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question_id": "cut off\n')
    else:
        write_jsonl(answers, spoil(rows))
    assert score_cli("gqa", answers, pristine, tmp_path / "out") == 0
    capsys.readouterr()
    assert score_cli("gqa", answers, pristine, tmp_path / "out", "--strict") == 3
    assert problem in capsys.readouterr().err


def test_strict_passes_a_clean_run(pristine, tmp_path):
    answers = tmp_path / "a.jsonl"
    write_jsonl(answers, reference_answers(pristine, "gqa"))
    assert score_cli("gqa", answers, pristine, tmp_path / "out", "--strict") == 0


def test_strict_fails_on_a_data_mismatch(data_root, tmp_path):
    answers = tmp_path / "a.jsonl"
    write_jsonl(answers, reference_answers(data_root, "pope"))
    (data_root / "pope/coco/coco_pope_extra.json").write_text("")
    assert score_cli("pope", answers, data_root, tmp_path / "out", "--strict") == 2


# --------------------------------------------------------------------------------------------
# Atomic output files


BENCH_OUTPUTS = {"gqa": ["testdev_balanced_predictions.json"], "mme": ["mme_results/existence.txt"],
                 "mmbench": ["mmbench_dev_20230712_m.xlsx"], "seed": ["seed_bench_m.jsonl"],
                 "vqav2": ["vqav2_test-dev2015_m.json"]}


@pytest.mark.parametrize("bench", sorted(BENCH_OUTPUTS))
def test_outputs_are_replaced_atomically(pristine, tmp_path, monkeypatch, bench):
    answers = tmp_path / "a.jsonl"
    write_jsonl(answers, reference_answers(pristine, bench))
    out = tmp_path / "out"
    score(bench, answers, pristine, out, model_id="m")
    names = BENCH_OUTPUTS[bench] + ["metrics.json"]
    before = {name: (out / name).read_bytes() for name in names}

    def interrupted(src, dst):  # the process dies between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    write_jsonl(answers, reference_answers(pristine, bench, model_id="m")[1:])
    with pytest.raises(KeyboardInterrupt):
        score(bench, answers, pristine, out, model_id="m")
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in names} == before
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
