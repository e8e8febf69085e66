"""The lmms_eval prompt style (the Qwen2.5-VL family's): what each Table 3 entry point asks, against a
restatement of lmms-eval's ``doc_to_text`` of the same document (tasks mmbench_en_dev, mme, pope,
scienceqa_img, textvqa_val with their default prompt kwargs); the answer lines keep LLaVA's prompt."""
from __future__ import annotations

import json
import math
from pathlib import Path

from restore.eval import mmbench, prompt_styles, science, vqa_loader
from restore.eval.entry_point import OPTION_LETTER_SUFFIX, SHORT_ANSWER_SUFFIX

SHORT = "\n" + SHORT_ANSWER_SUFFIX
LETTER = "\n" + OPTION_LETTER_SUFFIX


# ---- lmms-eval, restated from its task files (the strings of their default lmms_eval_specific_kwargs)
def lmms_mmbench(doc: dict) -> str:
    options = "There are several options:\n" + "".join(
        f"{k}. {doc[k]}\n" for k in "ABCDE" if doc.get(k) is not None and not _nan(doc[k]))
    options = options.rstrip("\n")
    hint = doc.get("hint")
    text = f"{hint} {doc['question']} {options}" if not _nan(hint) else f"{doc['question']} {options}"
    return f"{text}\n{LETTER}"


def lmms_mme(question: str) -> str:
    return question.replace(" Please answer yes or no.", "") + SHORT


def lmms_pope(question: str) -> str:
    return question.strip() + SHORT


def lmms_scienceqa(doc: dict) -> str:
    choices = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(doc["choices"]))
    context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
    return f"{context}{doc['question']}\n{choices}{LETTER}"


def lmms_textvqa(question: str) -> str:
    return question.capitalize() + SHORT


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == "nan"


# ---- LLaVA's question files of the same documents (docs: shared/benchmarks.md)
def test_vqa_style_texts(tmp_path: Path):
    rows = [
        ("pope", "Is there a snowboard in the image?", lambda q: q + SHORT, lmms_pope),
        ("mme", "Is this photo taken in a place of worship? Please answer yes or no.",
         lambda q: q.replace(" Please answer yes or no.", SHORT), lmms_mme),
        ("textvqa", "what does the NASA sign say on the Blue wall?",
         lambda q: f"{q}\nReference OCR token: NASA, Blue, wall{SHORT}", lmms_textvqa),
        ("textvqa", "Who made it?", lambda q: f"{q}\nReference OCR token: {SHORT}", lmms_textvqa),
    ]
    lines = [{"question_id": k, "image": "x.jpg", "text": llava(q)} for k, (_, q, llava, _) in enumerate(rows)]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = {"question_file": str(path), "image_folder": str(tmp_path)}
    llava_items = vqa_loader.build_items(settings)
    items = vqa_loader.build_items({**settings, "prompt_style": "lmms_eval"})
    assert [i.text for i in items] == [lmms(q) for _, q, _, lmms in rows]
    assert [i.text for i in llava_items] == [line["text"] for line in lines]  # LLaVA's style: as the file says
    assert [i.fields for i in items] == [i.fields for i in llava_items]  # the scorers' prompt is unchanged
    assert [i.key for i in items] == [i.key for i in llava_items]  # and so is what a resume matches


def test_mmbench_text(tmp_path: Path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "image"]
    docs = [{"index": 1, "question": "What is it?", "hint": "A hint.", "A": "cat", "B": "dog", "C": "bird"},
            {"index": 2, "question": "Which one?", "hint": None, "A": "1", "B": "2.50", "C": "x", "D": "y"},
            {"index": 3, "question": "Is it red?", "hint": "Look.\nClosely.", "A": "yes", "B": "no"}]
    lines = ["\t".join(header)] + ["\t".join(str(d.get(c) or "") for c in header[:-2]) + "\tA\taW1n" for d in docs]
    tsv = tmp_path / "mm.tsv"
    tsv.write_text("\n".join(lines).replace("Look.\nClosely.", '"Look.\nClosely."') + "\n")
    settings = {"question_file": str(tsv), "image_folder": None, "single_pred_prompt": True, "all_rounds": False,
                "lang": "en"}
    llava_items = mmbench.build_items(settings)
    items = mmbench.build_items({**settings, "prompt_style": "lmms_eval"})
    assert [i.text for i in items] == [lmms_mmbench(d) for d in docs]
    assert items[0].text == ("A hint. What is it? There are several options:\nA. cat\nB. dog\nC. bird\n\n"
                             "Answer with the option's letter from the given choices directly.")
    assert [i.fields for i in items] == [i.fields for i in llava_items]


def test_science_text(tmp_path: Path):
    docs = [{"hint": "The diagram shows a food web.", "question": "Which is a producer?", "choices": ["kelp", "otter"]},
            {"hint": "", "question": "Which word is a noun?", "choices": ["run", "table", "quickly"]}]
    problems = []
    for k, doc in enumerate(docs):
        choices = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(doc["choices"]))
        context = f"Context: {doc['hint']}\n" if doc["hint"] else ""  # as LLaVA's released CQM-A file has it
        human = f"<image>\n{context}{doc['question']}\n{choices}"
        problems.append({"id": str(k), "image": f"{k}/image.png",
                         "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "A"}]})
    path = tmp_path / "sqa.json"
    path.write_text(json.dumps(problems))
    settings = {"question_file": str(path), "image_folder": str(tmp_path), "single_pred_prompt": True,
                "answer_text_only": False}
    llava_items = science.build_items(settings)
    items = science.build_items({**settings, "prompt_style": "lmms_eval"})
    assert [i.text for i in items] == [lmms_scienceqa(d) for d in docs]
    assert [i.text for i in llava_items] == [i.text for i in items]  # the released file has lmms-eval's layout
    assert [i.fields for i in items] == [i.fields for i in llava_items]


def test_styles_and_their_records():
    assert prompt_styles.style_of({}) == "llava" == prompt_styles.DEFAULT_STYLE
    assert prompt_styles.style_of({"prompt_style": "lmms_eval"}) == "lmms_eval"
    # a text that is not TextVQA's three lines is left as it is
    two_lines = "What is it?\nReference OCR token: a"
    assert prompt_styles.vqa_text(two_lines, "lmms_eval") == two_lines
