"""Shard answer files of one run: check them, merge them, and finish the run (score, result record).

The launcher (restore.eval.launch, behind scripts/llava1_5/*.sh) calls these functions in-process after
its shards have run; the same steps by hand:

    python -m restore.eval.shards merge [--check] --out merge.jsonl chunks/4_0.jsonl ... chunks/4_3.jsonl
    python -m restore.eval.shards finish --benchmark gqa --answers-dir DIR --data-root DIR \\
        --results-dir DIR --model NAME --wall-time SECONDS chunks/4_0.jsonl ... chunks/4_3.jsonl

and, when several machines share a benchmark, before and after its shards run:

    python -m restore.eval.shards layout --answers-dir DIR --nodes 2 --node-rank 0 --shards 4
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import socket
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .answer_files import (answer_keys, chunk_items, meta_path, read_answer_lines, read_meta, write_atomic,
                           write_meta)
from .arguments import describe_reduction
from .entry_point import MAX_VISUAL_TOKENS, SetupError, entry_by_name, read_json
from .naming import recorded_tag


def chunk_problems(chunk_files: Sequence[str]) -> Tuple[List[str], List[str], Optional[Dict[str, Any]]]:
    """What keeps these chunk files (given in chunk order) from being one complete answer set:
    (not ready yet: missing or still incomplete, conflicts: other settings or chunking, damage; settings
    record of the first chunk found). Waiting helps with the first kind only."""
    not_ready: List[str] = []
    conflicts: List[str] = []
    reference: Optional[Dict[str, Any]] = None
    for position, path in enumerate(chunk_files):
        meta = read_meta(path)
        if meta is None:
            if os.path.exists(meta_path(path)):
                conflicts.append(f"{meta_path(path)}: damaged (not a readable settings record); "
                                 "delete the chunk and its .meta.json and rerun its node")
            else:
                not_ready.append(f"{path}: missing (its shard has not run or died before writing)")
            continue
        if reference is None:
            reference = meta
        if meta.get("entry") != reference.get("entry") or meta.get("settings") != reference.get("settings"):
            conflicts.append(f"{path}: produced with other settings than the first chunk found "
                             f"({describe_difference(reference, meta)}); every node must run the same command")
            continue
        if meta.get("num_chunks") != len(chunk_files) or meta.get("chunk_idx") != position:
            conflicts.append(f"{path}: holds chunk {meta.get('chunk_idx')} of {meta.get('num_chunks')}, "
                             f"expected chunk {position} of {len(chunk_files)} (every node needs the same "
                             "--shards and --nodes)")
            continue
        if not meta.get("complete"):
            not_ready.append(f"{path}: incomplete (its shard was interrupted or is still running)")
            continue
        entry = entry_by_name(meta["entry"])
        expected = [i.key for i in chunk_items(entry, meta["settings"], len(chunk_files), position)]
        try:
            lines, cut = read_answer_lines(path)
        except (OSError, SetupError) as e:
            conflicts.append(f"{path}: damaged ({e})")
            continue
        found = answer_keys(entry, lines)
        if cut or found != expected:
            conflicts.append(f"{path}: marked complete but holds {len(found)} answers, expected {len(expected)} "
                             "in question order (damaged: delete it and its .meta.json and rerun its node)")
    return not_ready, conflicts, reference


def describe_difference(reference: Dict[str, Any], meta: Dict[str, Any]) -> str:
    ours = {"entry": reference.get("entry"), **reference.get("settings", {})}
    theirs = {"entry": meta.get("entry"), **meta.get("settings", {})}
    return "; ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                     if ours.get(k) != theirs.get(k))


# --------------------------------------------------------------------------------------------------
# Node layouts: every node of a multi-node run must cut the questions the same way


NODES_FOLDER = "nodes"  # <answers dir>/nodes/<rank>.json: the layout each node of the current run uses


def node_layout(nodes: int, node_rank: int, shards: int) -> Dict[str, Any]:
    return {"nodes": nodes, "node_rank": node_rank, "shards": shards, "num_chunks": nodes * shards,
            "first_chunk": node_rank * shards, "last_chunk": node_rank * shards + shards - 1}


def describe_layout(layout: Mapping[str, Any]) -> str:
    return (f"--nodes {layout.get('nodes')} --shards {layout.get('shards')} (chunks {layout.get('first_chunk')}.."
            f"{layout.get('last_chunk')} of {layout.get('num_chunks')})")


def layout_conflicts(answers_dir: str, ours: Mapping[str, Any]) -> List[str]:
    """The other nodes whose recorded layout is not ours: their chunks and ours can never add up to the
    whole question file (gaps or overlaps), so waiting for them would wait forever."""
    folder = os.path.join(answers_dir, NODES_FOLDER)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    conflicts = []
    for name in names:
        path = os.path.join(folder, name)
        if not name.endswith(".json") or name == f"{ours['node_rank']}.json":
            continue
        try:
            theirs = read_json(path)
        except (OSError, SetupError):
            theirs = {}
        if not isinstance(theirs, dict):
            theirs = {}
        if (theirs.get("nodes"), theirs.get("shards")) != (ours["nodes"], ours["shards"]):
            conflicts.append(f"node {theirs.get('node_rank', name[:-5])} ({theirs.get('host', '?')}, started "
                             f"{theirs.get('started', '?')}; {path}) uses {describe_layout(theirs)}, this node "
                             f"{describe_layout(ours)}")
    return conflicts


def check_node_layout(answers_dir: str, nodes: int, node_rank: int, shards: int, record: bool) -> None:
    """Refuse a layout other nodes of this run do not share; with ``record``, then record ours."""
    ours = node_layout(nodes, node_rank, shards)
    conflicts = layout_conflicts(answers_dir, ours)
    if conflicts:
        raise SetupError("the nodes of this run cut the questions differently:\n  " + "\n  ".join(conflicts)
                         + "\nEvery node needs the same --nodes and --shards (the default --shards is the "
                         "node's GPU count: pass --shards when nodes differ). If the other run is over, delete "
                         f"{os.path.join(answers_dir, NODES_FOLDER)} and rerun.")
    if record:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_atomic(os.path.join(answers_dir, NODES_FOLDER, f"{node_rank}.json"),
                     json.dumps({**ours, "host": socket.gethostname(), "started": now}, indent=1) + "\n")


def forget_node_layouts(answers_dir: str) -> None:
    """After the merge the run is over: a later run may use another layout (and reuse these answers)."""
    folder = os.path.join(answers_dir, NODES_FOLDER)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.endswith(".json"):
            os.unlink(os.path.join(folder, name))


# --------------------------------------------------------------------------------------------------
# Merge and finish


def merge_chunks(chunk_files: Sequence[str], out: str) -> int:
    """Concatenate complete chunk files in order into ``out`` (atomically); returns the number of answers."""
    not_ready, conflicts, meta = chunk_problems(chunk_files)
    problems = conflicts + not_ready
    if problems:
        raise SetupError("cannot merge:\n  " + "\n  ".join(problems))
    assert meta is not None
    parts = []
    for path in chunk_files:
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    text = "".join(parts)
    write_atomic(out, text)
    n = text.count("\n")
    write_meta(out, {"entry": meta["entry"], "settings": meta["settings"], "num_chunks": 1, "chunk_idx": 0,
                     "n_items": n, "complete": True, "merged_from": list(chunk_files)})
    return n


def merge_and_report(chunk_files: Sequence[str], out: str) -> None:
    n = merge_chunks(chunk_files, out)
    print(f"merged {len(chunk_files)} chunk file(s), {n} answers -> {out}")


def unreduced_tokens(model_path: Optional[str]) -> int:
    """Visual tokens per image of the unreduced model, from its family (LLaVA-1.5's 576 when the
    checkpoint cannot be read)."""
    if model_path:
        try:
            from restore.families import family_of_checkpoint

            family = family_of_checkpoint(model_path)
            return family.visual_tokens_per_image(family.check_checkpoint(model_path))
        except (OSError, ValueError):
            pass
    return MAX_VISUAL_TOKENS


def write_result_record(results_dir: str, benchmark: str, answers_file: str, metrics_file: str,
                        model: str, wall_time_s: float, run_name: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """One JSON file per run under results_dir, as restore.report reads them; (path, record)."""
    meta = read_meta(answers_file) or {}
    settings = meta.get("settings", {})
    scored = read_json(metrics_file)
    with open(answers_file, encoding="utf-8") as f:
        n_items = sum(1 for line in f if line.strip())
    now = datetime.datetime.now(datetime.timezone.utc)
    base = settings.get("base")
    record = {
        "benchmark": benchmark,
        # restore.report's convention for "no reduction"
        "base": base if base else "none",
        "n_vis": settings.get("n_vis") if base else unreduced_tokens(settings.get("model_path")),
        # a budget given as a share of each image's tokens (n_vis is then None), only when there is one
        **({"keep": settings["keep"]} if base and settings.get("keep") is not None else {}),
        "restore": bool(settings.get("restore", False)),
        "model": model,
        "run_name": run_name or recorded_tag(settings),
        "metrics": scored.get("metrics", {}),
        "main_metric": scored.get("main_metric"),
        "n_items": n_items,
        "n_missing": scored.get("n_missing", 0),
        "wall_time_s": round(float(wall_time_s), 3),
        "timestamp": now.isoformat(timespec="seconds"),
        "settings": settings,
        "answers_file": os.path.abspath(answers_file),
    }
    tag = record["run_name"]
    path = os.path.join(results_dir, f"{benchmark}__{model}__{tag}__{now:%Y%m%dT%H%M%S}-{os.getpid()}.json")
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return path, record


# --------------------------------------------------------------------------------------------------
# What was merged: several nodes may finish together, and only one of them must merge and score


MERGED_FROM_SUFFIX = ".sources.json"  # merge.jsonl.sources.json: the chunk files of the scored merge


def chunk_fingerprints(chunk_files: Sequence[str]) -> List[Dict[str, Any]]:
    """Name, size and sha256 of each chunk file: equal exactly when the same answers would be merged (file
    times say nothing on a shared file system whose clocks differ, or after a copy)."""
    prints = []
    for path in chunk_files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        prints.append({"file": os.path.basename(path), "size": os.path.getsize(path), "sha256": digest.hexdigest()})
    return prints


def merged_sources_path(merged: str) -> str:
    return merged + MERGED_FROM_SUFFIX


def record_merged_sources(merged: str, chunk_files: Sequence[str], result: str) -> None:
    write_atomic(merged_sources_path(merged), json.dumps({"chunks": chunk_fingerprints(chunk_files),
                                                          "result": result}, indent=1) + "\n")


def already_merged(merged: str, chunk_files: Sequence[str]) -> Optional[str]:
    """The result record of an earlier merge and score of exactly these chunk files, or None."""
    try:
        recorded = read_json(merged_sources_path(merged))
    except (OSError, SetupError):
        return None
    if not isinstance(recorded, dict) or not os.path.exists(merged):
        return None
    try:
        same = recorded.get("chunks") == chunk_fingerprints(chunk_files)
    except OSError:
        return None
    return str(recorded.get("result") or "") if same else None


def finish_run(benchmark: str, chunk_files: Sequence[str], answers_dir: str, data_root: str, results_dir: str,
               model: str, wall_time_s: float, run_name: Optional[str] = None) -> int:
    """Merge the chunks, score with restore.eval.scoring, write the result record; an exit status."""
    return finish_config(benchmark, chunk_files, answers_dir, data_root, results_dir, model, wall_time_s,
                         run_name)[0]


def finish_config(benchmark: str, chunk_files: Sequence[str], answers_dir: str, data_root: str, results_dir: str,
                  model: str, wall_time_s: float,
                  run_name: Optional[str] = None) -> Tuple[int, Optional[Dict[str, Any]]]:
    """:func:`finish_run`, and the result record written (None when scoring failed)."""
    from restore.eval.scoring.__main__ import main as score_main

    merged = os.path.join(answers_dir, "merge.jsonl")
    merge_and_report(chunk_files, merged)
    scores = os.path.join(answers_dir, "scores")
    status = score_main([benchmark, "--answers", merged, "--data-root", data_root, "--out-dir", scores,
                         "--model-id", model])
    if status:
        return status, None
    path, record = write_result_record(results_dir, benchmark, merged, os.path.join(scores, "metrics.json"),
                                       model, wall_time_s, run_name)
    record_merged_sources(merged, chunk_files, path)
    forget_node_layouts(answers_dir)
    main_metric = record["main_metric"]
    value = record["metrics"].get(main_metric) if main_metric else None
    shown = f"{main_metric} = {value:.2f}" if isinstance(value, (int, float)) else "no local score"
    recorded = record["settings"]
    reduction = describe_reduction(recorded.get("base"), record["n_vis"], record["restore"],
                                   recorded.get("reduction_settings"), recorded.get("keep"))
    print(f"[{benchmark}] {model}, {reduction}: "
          f"{shown} ({record['n_items']} answers, inference {wall_time_s:.0f} s); result: {path}")
    return 0, record


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m restore.eval.shards",
                                description="helpers of the benchmark launcher (restore.eval.launch)")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", allow_abbrev=False, help="check chunk files (given in chunk order) and concatenate them")
    m.add_argument("--out", required=True)
    m.add_argument("--check", action="store_true", help="only check: exit 0 if mergeable, 3 if some chunk is missing or not complete yet, "
                        "1 on a conflict (other settings or chunking) or a damaged chunk")
    m.add_argument("chunks", nargs="+")
    f = sub.add_parser("finish", allow_abbrev=False, help="merge chunk files, score them, write a result record")
    f.add_argument("--benchmark", required=True)
    f.add_argument("--answers-dir", required=True)
    f.add_argument("--data-root", required=True)
    f.add_argument("--results-dir", required=True)
    f.add_argument("--model", required=True)
    f.add_argument("--wall-time", type=float, required=True)
    f.add_argument("--run-name", default=None, help="the answers subfolder; a non-default one is its own row "
                                                    "in restore.report")
    f.add_argument("chunks", nargs="+")
    n = sub.add_parser("layout", allow_abbrev=False, help="refuse a node layout (--nodes, --shards) other nodes of this run do not "
                                      "share (exit 1), else record this node's")
    n.add_argument("--answers-dir", required=True)
    n.add_argument("--nodes", type=int, required=True)
    n.add_argument("--node-rank", type=int, required=True)
    n.add_argument("--shards", type=int, required=True)
    n.add_argument("--check-only", action="store_true", help="do not record this node's layout")
    a = p.parse_args(argv)
    try:
        if a.command == "merge":
            if a.check:
                not_ready, conflicts, _ = chunk_problems(a.chunks)
                if conflicts:
                    print("error: these chunk files cannot be merged:\n  " + "\n  ".join(conflicts + not_ready),
                          file=sys.stderr)
                    return 1
                for problem in not_ready:
                    print(problem)
                return 3 if not_ready else 0
            merge_and_report(a.chunks, a.out)
            return 0
        if a.command == "layout":
            check_node_layout(a.answers_dir, a.nodes, a.node_rank, a.shards, record=not a.check_only)
            return 0
        return finish_run(a.benchmark, a.chunks, a.answers_dir, a.data_root, a.results_dir, a.model, a.wall_time,
                          a.run_name)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
