"""Resume across chunk layouts (another --shards / --nodes) and the node-layout records of multi-node runs.

No model: answers files are written by hand and plan_run (everything decided before the model loads) says
what would be reused.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from restore.eval import answer_files, arguments, shards, vqa_loader
from restore.eval.arguments import build_parser
from restore.eval.entry_point import SetupError, read_jsonl
from restore.eval.fixtures import make_fixtures
from restore.eval.plan import plan_run

ENTRY = vqa_loader.ENTRY


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    make_fixtures(root, n=3, seed=0)
    return root


@pytest.fixture(autouse=True)
def no_model_check(monkeypatch):
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)


def question_file(data: Path) -> Path:
    return data / "MME/llava_mme.jsonl"


def plan(data: Path, answers: Path, num_chunks: int, chunk_idx: int, *extra: str, questions: Path | None = None):
    argv = ["--model-path", "unused-llava", "--question-file", str(questions or question_file(data)),
            "--image-folder", str(data / "MME/MME_Benchmark_release_version"), "--answers-file", str(answers),
            "--device", "cpu", "--max_new_tokens", "2", "--num-chunks", str(num_chunks),
            "--chunk-idx", str(chunk_idx), *extra]
    the_plan = plan_run(ENTRY, build_parser(ENTRY).parse_args(argv), env={})
    the_plan.release()
    return the_plan


def write_chunk(data: Path, answers: Path, num_chunks: int, chunk_idx: int, *extra: str, keep=None,
                complete: bool = True, questions: Path | None = None) -> list:
    """A chunk file as a finished (or interrupted) shard leaves it; answers say which chunking wrote them."""
    p = plan(data, answers, num_chunks, chunk_idx, *extra, questions=questions)
    items = p.items if keep is None else [it for n, it in enumerate(p.items) if keep(n)]
    lines = [ENTRY.answer_line(it, f"from {answers.name}", "m") for it in items]
    answers.write_text("".join(json.dumps(line) + "\n" for line in lines))
    answer_files.write_meta(str(answers), {"entry": ENTRY.name, "settings": p.settings, "num_chunks": num_chunks,
                                           "chunk_idx": chunk_idx, "n_items": len(p.items), "complete": complete})
    return lines


def test_finished_answers_of_any_earlier_layout_are_reused(data, tmp_path):
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    n = len(read_jsonl(str(question_file(data))))
    # an earlier run cut the questions in 3; chunk 1 was interrupted after its first two answers
    for k in range(3):
        write_chunk(data, chunks / f"3_{k}.jsonl", 3, k, keep=(lambda i: i < 2) if k == 1 else None,
                    complete=k != 1)
    interrupted = set(range(*answer_files.chunk_bounds(n, 3, 1))[2:])
    for k in range(2):
        p = plan(data, chunks / f"2_{k}.jsonl", 2, k)
        start, _ = answer_files.chunk_bounds(n, 2, k)
        assert [it.key for it in p.pending] == [it.key for i, it in enumerate(p.items, start) if i in interrupted]
        assert set(p.done) == {it.key for it in p.items} - {it.key for it in p.pending}
        assert p.repaired  # the reused answers are written into 2_k.jsonl before it is appended to
        by_start = {answer_files.chunk_bounds(n, 3, j)[0]: j for j in range(3)}
        for i, it in enumerate(p.items, start):
            if it.key in p.done:
                j = max(s for s in by_start if s <= i)
                assert p.done[it.key]["text"] == f"from 3_{by_start[j]}.jsonl"
    # --overwrite recomputes
    assert len(plan(data, chunks / "2_0.jsonl", 2, 0, "--overwrite").pending) == len(plan(data, chunks / "2_0.jsonl",
                                                                                       2, 0).items)


def test_reuse_never_mixes_configurations_or_trusts_damaged_files(data, tmp_path):
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    write_chunk(data, chunks / "1_0.jsonl", 1, 0, "--max_new_tokens", "3")  # another configuration
    assert plan(data, chunks / "2_0.jsonl", 2, 0).done == {}
    assert len(plan(data, chunks / "2_0.jsonl", 2, 0, "--max_new_tokens", "3").pending) == 0

    write_chunk(data, chunks / "4_0.jsonl", 4, 0)
    Path(str(chunks / "4_0.jsonl") + ".meta.json").unlink()  # no settings record: unknown configuration
    write_chunk(data, chunks / "5_0.jsonl", 5, 0)
    (chunks / "5_0.jsonl").write_text("{broken\n" + (chunks / "5_0.jsonl").read_text())  # damaged
    assert plan(data, chunks / "2_0.jsonl", 2, 0).done == {}

    # the scripts' chunk files only: a file of another name does not look at its neighbours
    write_chunk(data, chunks / "6_0.jsonl", 6, 0)
    assert plan(data, chunks / "other.jsonl", 2, 0).done == {}
    assert plan(data, chunks / "2_0.jsonl", 2, 0).done != {}


def test_nodes_with_another_layout_are_refused_with_what_differs(tmp_path):
    shards.check_node_layout(str(tmp_path), nodes=2, node_rank=0, shards=1, record=True)
    shards.check_node_layout(str(tmp_path), nodes=2, node_rank=1, shards=1, record=True)  # same layout: fine
    shards.check_node_layout(str(tmp_path), nodes=2, node_rank=0, shards=1, record=True)  # a rerun of node 0
    with pytest.raises(SetupError) as refused:
        shards.check_node_layout(str(tmp_path), nodes=2, node_rank=1, shards=2, record=True)
    message = str(refused.value)
    assert "node 0" in message and "--nodes 2 --shards 1 (chunks 0..0 of 2)" in message
    assert "--nodes 2 --shards 2 (chunks 2..3 of 4)" in message and "same --nodes and --shards" in message
    # refused layouts are not recorded: node 0's check after its inference still passes
    assert shards.main(["layout", "--check-only", "--answers-dir", str(tmp_path), "--nodes", "2",
                        "--node-rank", "0", "--shards", "1"]) == 0
    assert shards.main(["layout", "--check-only", "--answers-dir", str(tmp_path), "--nodes", "3",
                        "--node-rank", "2", "--shards", "1"]) == 1
    shards.forget_node_layouts(str(tmp_path))
    shards.check_node_layout(str(tmp_path), nodes=3, node_rank=2, shards=4, record=True)  # the run is over


def test_overwrite_retires_other_layouts_and_the_newest_answer_wins(data, tmp_path):
    import os

    chunks = tmp_path / "chunks"
    chunks.mkdir()
    for k in range(3):
        write_chunk(data, chunks / f"3_{k}.jsonl", 3, k)
    for k in range(2):  # a rerun with another layout and --overwrite: the 3_* answers are outdated
        p = plan(data, chunks / f"2_{k}.jsonl", 2, k, "--overwrite")
        assert p.done == {} and len(p.pending) == len(p.items)
        write_chunk(data, chunks / f"2_{k}.jsonl", 2, k)
    assert sorted(f.name for f in chunks.glob("3_*.jsonl")) == []
    assert len(list(chunks.glob("3_*.jsonl.overwritten"))) == 3
    later = plan(data, chunks / "4_0.jsonl", 4, 0)
    assert later.pending == [] and all(line["text"].startswith("from 2_") for line in later.done.values())
    # without --overwrite, two layouts holding one answer: the newer file's is taken
    newer = chunks / "5_0.jsonl"
    write_chunk(data, newer, 5, 0)
    future = os.path.getmtime(newer) + 10
    os.utime(newer, (future, future))
    again = plan(data, chunks / "6_0.jsonl", 6, 0)
    assert again.done and all(line["text"] == "from 5_0.jsonl" for line in again.done.values())
