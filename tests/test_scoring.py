"""Scorers on hand-made official-format files and predictions; every expected number is worked out
by hand in the comments next to it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from restore.eval.scoring import DataFilesMissing, score
from restore.eval.scoring.__main__ import main as cli
from restore.eval.benchmarks.mmbench import extract_letter
from restore.eval.scoring.vqa_normalize import normalize_answer, soft_scores

SUFFIX = "\nAnswer the question using a single word or phrase."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def answer(qid, text, prompt="q", **extra) -> dict:
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {}, **extra}


# --------------------------------------------------------------------------------------------
# EvalAI normalization (TextVQA, VQAv2)


@pytest.mark.parametrize("raw, expected", [
    ("The Two dogs.", "2 dogs"),          # article dropped, number word, final period
    ("It's 3.5 miles", "it 's 3.5 miles"),  # "'s" split off, period between digits kept
    ("dont", "don't"),                    # contraction restored
    ("(hello)", "hello"),                 # brackets not next to a space become spaces
    ("x - ray", "x ray"),                 # "-" next to a space is deleted
    ("x-ray", "x ray"),                   # "-" elsewhere becomes a space
    ("ten.", "10"),
    ("1,000", "1000"),                    # commas go first
    ("Yes!", "yes"),
    ("a: b", "a: b"),                     # colon is not in the punctuation list; "a:" is no article
    ("An apple\nthe end", "apple end"),
    ("NONE", "0"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_soft_scores_leave_one_out():
    # "stop" given by 3 of 10: the 3 subsets without one of them have 2 matches (2/3), the other 7 have 3 (1):
    # (3 * 2/3 + 7) / 10 = 0.9. "go" given by 7: every subset has >= 6 matches -> 1.0.
    scores = soft_scores(["stop"] * 3 + ["go"] * 7)
    assert scores["stop"] == pytest.approx(0.9)
    assert scores["go"] == pytest.approx(1.0)
    # A single answer: its own subset has 0 matches, the 9 others 1 match (1/3): 9 / 3 / 10 = 0.3.
    assert soft_scores(["x"] + ["y"] * 9)["x"] == pytest.approx(0.3)


def test_textvqa_scores_normalized_predictions_and_lists_missing(tmp_path):
    data = [
        {"image_id": "img1", "question": "What does the sign say?", "question_id": 11,
         "answers": ["stop"] * 3 + ["go"] * 7},
        {"image_id": "img1", "question": "How many words?", "question_id": 12,
         "answers": ["two", "2"] + ["three"] * 8},
        {"image_id": "img2", "question": "What brand?", "question_id": 13, "answers": ["acme"] * 10},
    ]
    write_json(tmp_path / "textvqa" / "TextVQA_0.5.1_val.json", {"data": data})
    ocr = "\nReference OCR token: stop, go" + SUFFIX
    write_jsonl(tmp_path / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl",
                [{"question_id": d["image_id"], "image": f"{d['image_id']}.jpg", "text": d["question"] + ocr}
                 for d in data])
    answers = write_jsonl(tmp_path / "a.jsonl", [
        answer("img1", "The STOP.", prompt="What does the sign say?" + ocr),  # -> "stop": 0.9
        answer("img1", "Two", prompt="How many words?" + ocr),               # -> "2", given twice:
        # own 2 subsets 1 match (1/3), other 8 subsets 2 matches (2/3): (2/3 + 16/3) / 10 = 0.6
    ])
    result = score("textvqa", answers, tmp_path, tmp_path / "out")
    # (0.9 + 0.6 + 0 for the unanswered question 13) / 3 = 0.5
    assert result["metrics"]["accuracy"] == pytest.approx(50.0)
    assert result["missing_ids"] == ["img2 :: What brand? (question_id 13)"]
    assert result["n_missing"] == 1 and result["n_expected"] == 3


# --------------------------------------------------------------------------------------------
# POPE


def make_pope(root: Path, splits: dict[str, list[str]]) -> list[dict]:
    questions, qid = [], 0
    for split, labels in splits.items():
        rows = []
        for k, label in enumerate(labels):
            qid += 1
            text = f"Is there a thing {k} in the image?"
            rows.append({"question_id": k + 1, "image": f"i{k}.jpg", "text": text, "label": label})
            questions.append({"question_id": qid, "image": f"i{k}.jpg", "text": text + SUFFIX, "category": split})
        write_jsonl(root / "pope" / "coco" / f"coco_pope_{split}.json", rows)
    write_jsonl(root / "pope" / "llava_pope_test.jsonl", questions)
    return questions


def test_pope_parsing_metrics_and_missing(tmp_path):
    make_pope(tmp_path, {"adversarial": ["yes", "no", "yes", "no"], "random": ["no", "yes", "no", "yes"],
                         "popular": ["yes", "no"]})
    rows = [
        answer(1, "Yes, there is."),        # yes  (label yes) TP
        answer(2, "No, there is not."),     # "No" -> no (label no) TN
        answer(3, "There is not a dog"),    # "not" -> no (label yes) FN
        answer(4, ""),                      # empty -> yes (label no) FP
        answer(5, "No."),                   # no (label no) TN
        answer(6, "NO"),                    # upper case is not in the list -> yes (label yes) TP
        answer(7, "Not really"),            # "Not" is not in the list -> yes (label no) FP
        # question 8 unanswered
        answer(9, "Yes"), answer(10, "No"),  # popular: TP, TN -> F1 100
    ]
    answers = write_jsonl(tmp_path / "a.jsonl", list(reversed(rows)))  # order must not matter
    m = score("pope", answers, tmp_path, tmp_path / "out")
    metrics = m["metrics"]
    # adversarial: TP=FP=TN=FN=1 -> accuracy, precision, recall, F1, yes-ratio all 50
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert metrics[f"adversarial/{name}"] == pytest.approx(50.0)
    # random (3 answered): TN=1, TP=1, FP=1 -> acc 2/3, precision 1/2, recall 1, F1 = 2*.5*1/1.5 = 2/3, yes 2/3
    assert metrics["random/accuracy"] == pytest.approx(200 / 3)
    assert metrics["random/precision"] == pytest.approx(50.0)
    assert metrics["random/recall"] == pytest.approx(100.0)
    assert metrics["random/f1"] == pytest.approx(200 / 3)
    assert metrics["random/yes_ratio"] == pytest.approx(200 / 3)
    assert metrics["popular/f1"] == pytest.approx(100.0)
    assert metrics["f1_mean"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert m["main_metric"] == "f1_mean"
    assert m["missing_ids"] == ["8"] and m["n_expected"] == 10


# --------------------------------------------------------------------------------------------
# MME


def make_mme(root: Path) -> None:
    release = root / "MME" / "MME_Benchmark_release_version"
    files = {
        "existence/0001.txt": ["Is there a cat? Please answer yes or no.\tYes", "Is there a dog? Please answer yes or no.\tNo"],
        "existence/0002.txt": ["Is there a car? Please answer yes or no.\tYes", "Is there a bus? Please answer yes or no.\tNo"],
        "artwork/questions_answers_YN/123.txt": ["Is this by Monet?  Please answer yes or no.\tYes",
                                                 "Is this by Goya? Please answer yes or no.\tNo"],
        "code_reasoning/0001.txt": ["Does it print 1? Please answer yes or no.\tNo", "Does it print 2? Please answer yes or no.\tYes"],
    }
    from restore.eval.benchmarks.mme import COGNITION, PERCEPTION

    for category in PERCEPTION + COGNITION:  # one unanswered image in each other subtask: scores 0
        if not any(name.startswith(category + "/") for name in files):
            files[f"{category}/0009.txt"] = [f"Is it {category}? Please answer yes or no.\tYes",
                                             f"Is it not {category}? Please answer yes or no.\tNo"]
    for name, lines in files.items():
        (release / name).parent.mkdir(parents=True, exist_ok=True)
        (release / name).write_text("\n".join(lines) + "\n")
    (release / "artwork" / "images").mkdir(parents=True, exist_ok=True)
    questions = []
    for name, lines in files.items():
        category = name.split("/")[0]
        image = f"{category}/images/123.jpg" if category == "artwork" else name.replace(".txt", ".png")
        for line in lines:
            question = line.split("\t")[0].replace("Please answer yes or no.", "").strip()
            questions.append({"question_id": image, "image": image, "text": question + SUFFIX, "category": category})
    write_jsonl(root / "MME" / "llava_mme.jsonl", questions)


def test_mme_scores_per_subtask_with_prefix_rules(tmp_path):
    make_mme(tmp_path)
    questions = [json.loads(l) for l in (tmp_path / "MME" / "llava_mme.jsonl").read_text().splitlines()]
    outputs = ["Yes", "No, it is not.", "I think yes", "Nope",  # existence: ok, ok ("no, "), other, ok ("nope")
               "yes", None,                                      # artwork: ok (two-space line), missing
               "Yes", "eyes"]                                    # code: wrong, "eyes"[:4] holds "yes" -> ok
    rows = [answer(q["question_id"], t, prompt=q["text"]) for q, t in zip(questions, outputs) if t is not None]
    result = score("mme", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out")
    m = result["metrics"]
    # existence: acc 3/4, acc+ 1/2 (only image 0001 fully right) -> 125
    assert m["existence"] == pytest.approx(125.0)
    # artwork: acc 1/2, acc+ 0 -> 50; code_reasoning: acc 1/2, acc+ 0 -> 50
    assert m["artwork"] == pytest.approx(50.0)
    assert m["code_reasoning"] == pytest.approx(50.0)
    assert m["perception"] == pytest.approx(175.0)
    assert m["cognition"] == pytest.approx(50.0)
    assert m["total"] == pytest.approx(225.0) and result["main_metric"] == "total"
    assert result["n_missing"] == 1 + 2 * 11  # Goya, and the 11 other subtasks' questions
    assert result["missing_ids"][0].startswith("artwork/images/123.jpg :: Is this by Goya?")
    # converter-style txt file for calculation.py: name, question (original), gt, prediction
    lines = (tmp_path / "out" / "mme_results" / "existence.txt").read_text().splitlines()
    assert lines[1] == "0001.txt\tIs there a dog? Please answer yes or no.\tNo\tNo, it is not."


# --------------------------------------------------------------------------------------------
# ScienceQA


def make_sqa(root: Path) -> None:
    def problem(n_choices, answer, image=True, split="test"):
        return {"question": "q", "choices": [f"c{i}" for i in range(n_choices)], "answer": answer, "hint": "",
                "image": "image.png" if image else None, "split": split}

    problems = {"1": problem(4, 2), "2": problem(2, 0), "3": problem(3, 1), "4": problem(2, 0),
                "5": problem(2, 0, image=False), "6": problem(2, 0, split="train"), "7": problem(2, 1), "8": problem(3, 1)}
    write_json(root / "scienceqa" / "problems.json", problems)
    write_json(root / "scienceqa" / "pid_splits.json", {"train": ["6"], "val": [], "test": ["1", "2", "3", "4", "5", "7", "8"]})
    write_json(root / "scienceqa" / "llava_test_CQM-A.json",
               [{"id": pid, "conversations": [], **({"image": f"{pid}/image.png"} if problems[pid]["image"] else {})}
                for pid in ("1", "2", "3", "4", "5", "7", "8")])


def test_sqa_parsing_and_image_only_run(tmp_path):
    make_sqa(tmp_path)
    rows = [
        answer("1", "The answer is C."),                    # C, gold C: right
        answer("2", "A."),                                   # too short for "X. ", no pattern: FAILED
        answer("3", "B. the second"),                        # B, gold B: right
        answer("7", "C"),                                    # C is outside 2 choices: wrong, not FAILED
        answer("8", "The answer is A. The answer is B."),    # pattern twice: FAILED
        # problem 4 (image) unanswered: FAILED
    ]
    result = score("sqa", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out")
    # image problems 1, 2, 3, 4, 7, 8: 2 right -> 33.3; no text-only answer -> overall accuracy not defined
    assert result["metrics"]["img_accuracy"] == pytest.approx(100 * 2 / 6)
    assert result["metrics"]["accuracy"] is None
    assert result["metrics"]["failed"] == 3
    assert result["missing_ids"] == ["4"] and result["n_expected"] == 6


def test_sqa_with_text_only_answers_reports_overall_accuracy(tmp_path):
    make_sqa(tmp_path)
    rows = [answer("1", "C"), answer("5", "A"), answer("6", "A")]  # 6 is a training problem: unexpected
    result = score("sqa", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out")
    assert result["metrics"]["accuracy"] == pytest.approx(100 * 2 / 7)  # 1 and 5 right out of 7 test problems
    assert result["metrics"]["img_accuracy"] == pytest.approx(100 * 1 / 6)
    assert result["n_unexpected"] == 1 and result["unexpected_ids"] == ["6"]


# --------------------------------------------------------------------------------------------
# GQA


def test_gqa_exact_match_after_period_strip_and_lowercase(tmp_path):
    def q(answer, structural):
        return {"question": "q", "imageId": "n1", "answer": answer, "isBalanced": True, "types": {"structural": structural}}

    write_json(tmp_path / "gqa" / "data" / "testdev_balanced_questions.json", {
        "1": q("yes", "verify"), "2": q("red", "query"), "3": q("no", "logical"), "4": q("circle", "query"),
        "5": q("yes", "verify")})
    write_jsonl(tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl",
                [{"question_id": qid, "image": "n1.jpg", "text": "q" + SUFFIX} for qid in "12345"])
    rows = [answer("1", "Yes."), answer("2", "Red.."), answer("3", "No"), answer("5", "yes ")]
    result = score("gqa", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out")
    # 1 "yes" ok, 2 "red" ok, 3 "no" ok, 5 "yes " (space kept) wrong, 4 missing -> 3/5
    assert result["metrics"]["accuracy"] == pytest.approx(60.0)
    assert result["metrics"]["binary"] == pytest.approx(100 * 2 / 3)  # 1, 3, 5
    assert result["metrics"]["open"] == pytest.approx(50.0)           # 2, 4
    assert result["missing_ids"] == ["4"]
    predictions = json.loads((tmp_path / "out" / "testdev_balanced_predictions.json").read_text())
    assert predictions[1] == {"questionId": "2", "prediction": "red"}


# --------------------------------------------------------------------------------------------
# SEED


def make_seed(root: Path) -> None:
    questions = [
        {"question_id": "101", "data_type": "image", "question_type_id": 1, "answer": "A"},
        {"question_id": "102", "data_type": "image", "question_type_id": 1, "answer": "B"},
        {"question_id": "103", "data_type": "image", "question_type_id": 5, "answer": "C"},
        {"question_id": "v7", "data_type": "video", "question_type_id": 10, "answer": "D"},
    ]
    for q in questions:
        q["question"] = f"Question {q['question_id']}?"
    write_json(root / "seed_bench" / "SEED-Bench.json", {
        "question_type": {"Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 10},
        "questions": questions})
    folder = {"image": "SEED-Bench-image", "video": "SEED-Bench-video-image"}
    write_jsonl(root / "seed_bench" / "llava-seed-bench.jsonl", [
        {"question_id": q["question_id"], "image": f"{folder[q['data_type']]}/{q['question_id']}.png",
         "text": q["question"] + "\nA. a\nB. b\nC. c\nD. d"} for q in questions])


def test_seed_exact_letter_image_only(tmp_path):
    make_seed(tmp_path)
    rows = [answer(101, "A"), answer(102, "B."), answer(103, "c")]  # only the bare, upper-case letter counts
    result = score("seed", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out", model_id="m")
    assert result["metrics"]["image_accuracy"] == pytest.approx(100 / 3)
    assert result["metrics"]["total_accuracy"] is None and result["metrics"]["video_accuracy"] is None
    assert result["metrics"]["Scene Understanding"] == pytest.approx(50.0)
    assert result["n_expected"] == 3 and result["n_missing"] == 0
    upload = [json.loads(l) for l in (tmp_path / "out" / "seed_bench_m.jsonl").read_text().splitlines()]
    assert upload[1] == {"question_id": "102", "prediction": "B."}


def test_seed_with_video_answers(tmp_path):
    make_seed(tmp_path)
    rows = [answer(101, "A"), answer("v7", "D")]
    result = score("seed", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out")
    # 101 and v7 right out of 4; image 1/3; video 1/1; 102, 103 missing (wrong)
    assert result["metrics"]["total_accuracy"] == pytest.approx(50.0)
    assert result["metrics"]["video_accuracy"] == pytest.approx(100.0)
    assert result["metrics"]["image_accuracy"] == pytest.approx(100 / 3)
    assert result["missing_ids"] == ["102", "103"]
    assert result["main_metric"] == "total_accuracy"  # the paper's SEED: all questions, image and video


def test_seed_image_only_run_is_seed_img(tmp_path):
    make_seed(tmp_path)
    result = score("seed", write_jsonl(tmp_path / "a.jsonl", [answer(101, "A")]), tmp_path, tmp_path / "out")
    assert result["main_metric"] == "image_accuracy" and result["metrics"]["total_accuracy"] is None
    assert any(note.startswith("SEED-IMG") for note in result["notes"])


def write_settings(answers: Path, settings: dict) -> None:
    answers.with_name(answers.name + ".meta.json").write_text(json.dumps({"settings": settings}))


def test_seed_run_settings_decide_the_expected_questions(tmp_path):
    make_seed(tmp_path)
    # A full run whose video answers were lost: the videos stay expected (missing), not silently dropped.
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(101, "A"), answer(102, "B"), answer(103, "C")])
    write_settings(answers, {"only_images_under": None})
    result = score("seed", answers, tmp_path, tmp_path / "out")
    assert result["main_metric"] == "total_accuracy" and result["missing_ids"] == ["v7"]
    assert result["metrics"]["total_accuracy"] == pytest.approx(75.0)
    # A run restricted to the image folder is SEED-IMG.
    write_settings(answers, {"only_images_under": "SEED-Bench-image/"})
    result = score("seed", answers, tmp_path, tmp_path / "out")
    assert result["main_metric"] == "image_accuracy" and result["n_missing"] == 0


# --------------------------------------------------------------------------------------------
# MMBench


OPTIONS4 = {"A": "red", "B": "green", "C": "blue", "D": "black"}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("D)", "D"), ("B. green", "B"), ("(A) red", "A"), ("C: blue", "C"),
    ("The answer is C.", "C"), ("Answer: (D)", "D"), ("blue", "C"), ("Blue.", "C"),
    ("E", None),                 # not one of the row's options
    ("A cat on a mat", None),    # a capital word is not a letter answer
    ("the answer is a dog", None),
    ("I don't know", None),
])
def test_mmbench_letter_extraction(text, expected):
    assert extract_letter(text, OPTIONS4) == expected


def make_mmbench(root: Path) -> None:
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit"
    four = ["red", "green", "blue", "black"]
    rows = []
    for k in range(4):  # question 7, right answer "blue", options rotated left by k
        opts = four[k:] + four[:k]
        rows.append([7 + k * 1_000_000, "Color?", "", *opts, "ABCD"[opts.index("blue")], "c1", "aW1n", "s", "Coarse", "", "dev"])
    two = ["yes", "no"]
    for k in range(2):  # question 9, right answer "yes"
        opts = two[k:] + two[:k]
        rows.append([9 + k * 1_000_000, "Cat?", "a hint", *opts, "", "", "ABCD"[opts.index("yes")], "c2", "aW1n", "s",
                     "Logic", "", "dev"])
    text = header + "\n" + "".join("\t".join(str(c) for c in r) + "\n" for r in rows)
    (root / "mmbench").mkdir(parents=True)
    (root / "mmbench" / "mmbench_dev_20230712.tsv").write_text(text)


def test_mmbench_circular_eval(tmp_path):
    make_mmbench(tmp_path)
    rows = [
        answer(7, "C", round_id=0), answer(1000007, "B.", round_id=0),            # rotations 0 and 1: blue at C, B
        answer(2000007, "(A)", round_id=0), answer(3000007, "The answer is D", round_id=0),  # blue at A, D
        answer(9, "A", round_id=0), answer(1000009, "A cat", round_id=0),         # copy 1: "yes" is B; unparsed
    ]
    result = score("mmbench", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out", model_id="m")
    m = result["metrics"]
    assert m["circular_accuracy"] == pytest.approx(50.0)   # question 7 right on all copies, 9 not
    assert m["vanilla_accuracy"] == pytest.approx(100.0)   # rows 7 and 9 both right
    assert m["row_accuracy"] == pytest.approx(100 * 5 / 6)
    assert m["unparsed"] == 1
    import pandas as pd

    sheet = pd.read_excel(tmp_path / "out" / "mmbench_dev_20230712_m.xlsx")
    assert list(sheet.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert sheet.loc[sheet["index"] == 1000009, "prediction"].item() == "A cat"


def test_mmbench_missing_copy_fails_its_question(tmp_path):
    make_mmbench(tmp_path)
    rows = [answer(7, "C"), answer(1000007, "B"), answer(2000007, "A"), answer(9, "A"), answer(1000009, "B")]
    result = score("mmbench", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out")
    assert result["metrics"]["circular_accuracy"] == pytest.approx(50.0)  # 7 lacks copy 3
    assert result["missing_ids"] == [3000007]


# --------------------------------------------------------------------------------------------
# OCRBench


def test_ocrbench_substring_rules(tmp_path):
    items = [
        {"dataset_name": "IIIT5K", "id": 0, "image_path": "a.png", "question": "q", "answers": ["Hello"], "type": "Regular Text Recognition"},
        {"dataset_name": "HME100k", "id": 1, "image_path": "b.png", "question": "q", "answers": "x ^ { 2 }",
         "type": "Handwritten Mathematical Expression Recognition"},
        {"dataset_name": "HME100k", "id": 2, "image_path": "c.png", "question": "q", "answers": "X ^ 2",
         "type": "Handwritten Mathematical Expression Recognition"},
        {"dataset_name": "docVQA", "id": 3, "image_path": "d.png", "question": "q", "answers": ["cat", "kitten"], "type": "Doc-oriented VQA"},
        {"dataset_name": "STVQA", "id": 4, "image_path": "e.png", "question": "q", "answers": ["new york"], "type": "Scene Text-centric VQA"},
        {"dataset_name": "FUNSD", "id": 5, "image_path": "f.png", "question": "q", "answers": ["ACME corp"], "type": "Key Information Extraction"},
    ]
    write_json(tmp_path / "ocrbench" / "OCRBench.json", items)
    predictions = ["the word is hello",  # lower-cased substring: right
                   "x^{2}+1",            # HME100k: spaces removed: right
                   "x^2",                # HME100k keeps case: "X^2" not in "x^2": wrong
                   "Kitten.",            # any answer of the list: right
                   "New\nYork"]          # newline becomes a space: right; FUNSD unanswered
    rows = [{**item, "predict": p} for item, p in zip(items, predictions)]
    result = score("ocrbench", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out")
    m = result["metrics"]
    assert m["final_score"] == 4 and result["main_metric"] == "final_score"
    assert m["Handwritten Mathematical Expression Recognition"] == 1
    assert m["text_recognition"] == 1
    assert m["dataset/HME100k"] == pytest.approx(50.0) and m["dataset/FUNSD"] == 0.0
    assert result["missing_ids"] == ["FUNSD/5 (f.png)"]


# --------------------------------------------------------------------------------------------
# VQAv2


def test_vqav2_submission_covers_full_test_set(tmp_path):
    write_jsonl(tmp_path / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl", [{"question_id": i, "text": "q"} for i in (1, 2, 3)])
    write_jsonl(tmp_path / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl", [{"question_id": i, "text": "q"} for i in (1, 2, 3, 4)])
    rows = [answer(1, "Two dogs."), answer(2, "Yes!")]
    result = score("vqav2", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, tmp_path / "out", model_id="m")
    assert result["main_metric"] is None
    assert result["metrics"]["answered"] == pytest.approx(200 / 3)
    assert result["missing_ids"] == ["3"]
    submission = json.loads((tmp_path / "out" / "vqav2_test-dev2015_m.json").read_text())
    assert submission == [{"question_id": 1, "answer": "2 dogs"}, {"question_id": 2, "answer": "yes"},
                          {"question_id": 3, "answer": ""}, {"question_id": 4, "answer": ""}]


# --------------------------------------------------------------------------------------------
# Files, CLI and errors


def test_bad_answer_lines_are_counted_not_fatal(tmp_path):
    make_seed(tmp_path)
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(answer(101, "A")) + "\n" + '{"question_id": 102, "te\n')
    result = score("seed", path, tmp_path, tmp_path / "out")
    assert result["n_bad_answer_lines"] == 1 and result["bad_answer_lines"] == [2]
    assert result["missing_ids"] == ["102", "103"]


def test_cli_writes_metrics_json_and_exit_codes(tmp_path, capsys):
    make_seed(tmp_path)
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(101, "A"), answer(102, "B"), answer(103, "D")])
    assert cli(["seed", "--answers", str(answers), "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "o")]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert {"benchmark", "metrics", "main_metric", "n_answers", "n_expected", "missing_ids", "n_missing"} <= set(metrics)
    assert metrics["metrics"]["image_accuracy"] == pytest.approx(200 / 3)
    assert "image_accuracy" in capsys.readouterr().out

    partial = write_jsonl(tmp_path / "b.jsonl", [answer(101, "A")])
    args = ["seed", "--answers", str(partial), "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "o2")]
    assert cli(args) == 0
    assert cli(args + ["--strict"]) == 3

    assert cli(["pope", "--answers", str(answers), "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "o3")]) == 2
    assert "llava_pope_test.jsonl" in capsys.readouterr().err


def test_missing_data_files_raise_clear_error(tmp_path):
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(1, "yes")])
    with pytest.raises(DataFilesMissing, match="testdev_balanced_questions.json"):
        score("gqa", answers, tmp_path, tmp_path / "out")
    with pytest.raises(DataFilesMissing, match="answer file"):
        score("gqa", tmp_path / "absent.jsonl", tmp_path, tmp_path / "out")


def test_check_data_finds_each_scorer_file_missing_before_any_answers(tmp_path, capsys):
    from restore.eval.fixtures import make_fixtures
    from restore.eval.scoring import BENCHMARKS, check_data

    make_fixtures(tmp_path, n=1, seed=0)
    for bench in BENCHMARKS:
        check_data(bench, tmp_path)
    needed = {"gqa": "gqa/data/testdev_balanced_questions.json", "seed": "seed_bench/SEED-Bench.json",
              "textvqa": "textvqa/TextVQA_0.5.1_val.json", "sqa": "scienceqa/pid_splits.json",
              "ocrbench": "ocrbench/OCRBench.json", "mmbench": "mmbench/mmbench_dev_20230712.tsv",
              "vqav2": "vqav2/llava_vqav2_mscoco_test2015.jsonl"}
    for bench, relative in needed.items():
        path = tmp_path / relative
        kept = path.read_bytes()
        path.unlink()
        with pytest.raises(DataFilesMissing, match=path.name):
            check_data(bench, tmp_path)
        path.write_bytes(kept)
    for label in (tmp_path / "pope/coco").glob("coco_pope_*.json"):
        label.rename(label.with_suffix(".bak"))
    with pytest.raises(DataFilesMissing, match="coco_pope_"):
        check_data("pope", tmp_path)
    (tmp_path / "MME/MME_Benchmark_release_version").rename(tmp_path / "MME/elsewhere")
    assert cli(["mme", "--data-root", str(tmp_path), "--check-data"]) == 2
    assert "MME_Benchmark_release_version" in capsys.readouterr().err
    assert cli(["gqa", "--data-root", str(tmp_path), "--check-data"]) == 0
