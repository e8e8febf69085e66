"""The fixture generator writes each benchmark in its official format: every scorer accepts it, rates
correct answers 100%, and names a removed answer; output is a function of the seed."""
from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from restore.eval.fixtures import BENCHMARKS, main, make_fixtures, reference_answers, write_reference_answers
from restore.eval.scoring import score

N = 6


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixtures")
    make_fixtures(root, n=N, seed=0)
    return root


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "fixture_manifest.json"}


PERFECT = {  # benchmark -> (metric, value for all-correct answers)
    "gqa": ("accuracy", 100.0), "seed": ("image_accuracy", 100.0), "mmbench": ("circular_accuracy", 100.0),
    "mme": ("total", 2800.0), "pope": ("f1_mean", 100.0), "sqa": ("img_accuracy", 100.0),
    "textvqa": ("accuracy", 100.0), "ocrbench": ("accuracy", 100.0), "vqav2": ("answered", 100.0),
}


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_correct_answers_score_full_marks(data_root, tmp_path, bench):
    answers = write_reference_answers(data_root, bench, tmp_path / f"{bench}.jsonl")
    result = score(bench, answers, data_root, tmp_path / "out")
    metric, value = PERFECT[bench]
    assert result["metrics"][metric] == pytest.approx(value)
    assert result["n_missing"] == 0 and result["n_unexpected"] == 0
    assert result["n_expected"] >= 1


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _constant_answers(questions: list[dict], text: str) -> list[dict]:
    return [{"question_id": q["question_id"], "prompt": q["text"], "text": text} for q in questions]


def test_mme_all_yes_scores_what_the_fixture_layout_implies(data_root, tmp_path):
    # Expectation from how the fixtures are built, not from any scorer helper: every MME image has
    # one Yes and one No question, so answering "Yes" throughout gets acc 1/2 and acc+ 0 in each of the
    # 14 subtasks: 100 * (0.5 + 0) = 50 each, 500 perception (10 subtasks), 200 cognition (4).
    questions = _read_jsonl(data_root / "MME" / "llava_mme.jsonl")
    path = tmp_path / "yes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _constant_answers(questions, "Yes")))
    metrics = score("mme", path, data_root, tmp_path / "out")["metrics"]
    assert (metrics["perception"], metrics["cognition"], metrics["total"]) == (500.0, 200.0, 700.0)
    assert metrics["existence"] == metrics["code_reasoning"] == 50.0


def test_mme_reference_answers_are_the_release_answers(data_root):
    # Read the release txt files directly: line "question<TAB>answer" next to the image's stem.
    release = data_root / "MME" / "MME_Benchmark_release_version"
    truth = {}
    for txt in release.rglob("*.txt"):
        for line in txt.read_text().splitlines():
            question, answer = line.split("\t")
            category = txt.relative_to(release).parts[0]
            truth[(category, txt.stem, " ".join(question.split()[:-5]))] = answer  # minus "Please answer yes or no."
    for row in reference_answers(data_root, "mme"):
        key = (row["question_id"].split("/")[0], Path(row["question_id"]).stem, row["prompt"].split("\n")[0])
        assert row["text"] == truth[key]


def test_pope_all_yes_scores_recall_100_and_precision_the_share_of_yes_labels(data_root, tmp_path):
    questions = _read_jsonl(data_root / "pope" / "llava_pope_test.jsonl")
    path = tmp_path / "yes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _constant_answers(questions, "Yes")))
    metrics = score("pope", path, data_root, tmp_path / "out")["metrics"]
    for split in ("adversarial", "popular", "random"):
        labels = [row["label"] for row in _read_jsonl(data_root / "pope" / "coco" / f"coco_pope_{split}.json")]
        share = labels.count("yes") / len(labels)
        assert metrics[f"{split}/recall"] == pytest.approx(100.0)
        assert metrics[f"{split}/precision"] == pytest.approx(100 * share)
        assert metrics[f"{split}/f1"] == pytest.approx(100 * 2 * share / (share + 1))


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_removed_answer_is_reported_by_id(data_root, tmp_path, bench):
    rows = reference_answers(data_root, bench)
    dropped = rows.pop(len(rows) // 2)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = score(bench, path, data_root, tmp_path / "out")
    assert result["n_missing"] == 1
    shown = result["missing_ids"][0]
    identifier = dropped.get("question_id", dropped.get("id"))
    assert str(identifier) in str(shown) or shown == identifier
    if PERFECT[bench][0] != "answered" and bench != "pope":  # POPE leaves unanswered items out of its counts
        assert result["metrics"][PERFECT[bench][0]] < PERFECT[bench][1]


def test_same_seed_same_files_other_seed_differs(tmp_path):
    make_fixtures(tmp_path / "a", n=3, seed=7, benchmarks=["pope", "mmbench", "sqa"])
    make_fixtures(tmp_path / "b", n=3, seed=7, benchmarks=["pope", "mmbench", "sqa"])
    make_fixtures(tmp_path / "c", n=3, seed=8, benchmarks=["pope", "mmbench", "sqa"])
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_images_vary_in_size_and_aspect_ratio(data_root):
    sizes = {Image.open(p).size for p in (data_root / "gqa").rglob("*.jpg")}
    sizes |= {Image.open(p).size for p in (data_root / "MME").rglob("*.[jp][pn]g")}
    ratios = {round(w / h, 2) for w, h in sizes}
    assert any(r > 1.2 for r in ratios) and any(r < 0.8 for r in ratios) and len(sizes) >= 4


def test_official_layouts(data_root):
    import pandas as pd

    table = pd.read_csv(data_root / "mmbench" / "mmbench_dev_20230712.tsv", sep="\t")
    assert list(table.columns[:8]) == ["index", "question", "hint", "A", "B", "C", "D", "answer"]
    bases = table["index"] % 1_000_000
    assert len(set(bases)) == N and (table["index"] >= 1_000_000).any()
    Image.open(io.BytesIO(base64.b64decode(table["image"][0]))).verify()

    seed = json.loads((data_root / "seed_bench" / "SEED-Bench.json").read_text())
    assert {q["data_type"] for q in seed["questions"]} == {"image", "video"}
    for line in (data_root / "seed_bench" / "llava-seed-bench.jsonl").read_text().splitlines():
        assert (data_root / "seed_bench" / json.loads(line)["image"]).is_file()

    release = data_root / "MME" / "MME_Benchmark_release_version"
    assert (release / "artwork" / "questions_answers_YN").is_dir() and (release / "artwork" / "images").is_dir()
    assert list((release / "code_reasoning").glob("*.txt")) and not (release / "code_reasoning" / "images").exists()

    assert sorted(p.name for p in (data_root / "pope" / "coco").iterdir()) == [
        "coco_pope_adversarial.json", "coco_pope_popular.json", "coco_pope_random.json"]

    items = json.loads((data_root / "scienceqa" / "llava_test_CQM-A.json").read_text())
    assert any("image" in it for it in items) and any("image" not in it for it in items)
    for item in items:
        assert item["conversations"][0]["value"].startswith("<image>\n") == ("image" in item)
        if "image" in item:
            assert (data_root / "scienceqa" / "images" / "test" / item["image"]).is_file()

    for item in json.loads((data_root / "ocrbench" / "OCRBench.json").read_text()):
        assert (data_root / "ocrbench" / "data" / item["image_path"]).is_file()
    dev = (data_root / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl").read_text().splitlines()
    full = (data_root / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl").read_text().splitlines()
    assert {json.loads(l)["question_id"] for l in dev} < {json.loads(l)["question_id"] for l in full}


def test_corrupt_option_breaks_one_image(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--n", "3", "--benchmarks", "pope", "gqa", "--corrupt", "pope"]) == 0
    manifest = json.loads((tmp_path / "fixture_manifest.json").read_text())
    broken = Path(manifest["corrupt"]["file"])
    assert broken.parent.name == "val2014" and manifest["corrupt"]["question_ids"]
    with pytest.raises(Exception):
        Image.open(broken).load()
    for image in (tmp_path / "gqa").rglob("*.jpg"):
        Image.open(image).load()  # the other benchmarks stay intact


def test_corrupt_mmbench_row(tmp_path):
    import pandas as pd

    manifest = make_fixtures(tmp_path, n=2, benchmarks=["mmbench"], corrupt="mmbench")
    table = pd.read_csv(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", sep="\t")
    row = table[table["index"] == manifest["corrupt"]["question_ids"][0]]
    with pytest.raises(Exception):
        Image.open(io.BytesIO(base64.b64decode(row["image"].item()))).load()


def test_rejects_unknown_benchmark(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        make_fixtures(tmp_path, benchmarks=["vizwiz"])
