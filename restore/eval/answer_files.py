"""Answers files: chunking, keys, the settings record next to each file, resume and question order.

Next to every answers file ``X.jsonl`` lies ``X.jsonl.meta.json``: the settings that produced it, the
chunk it covers and whether it is complete. A resume with other settings is refused, and
``python -m restore.eval.shards merge`` uses it to check every chunk before concatenating them.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from restore.jsonio import write_text as write_atomic

from .entry_point import EntryPoint, Item, SetupError

META_SUFFIX = ".meta.json"
LOCK_SUFFIX = ".lock"


# --------------------------------------------------------------------------------------------------
# Chunks and keys


def chunk_bounds(total: int, num_chunks: int, chunk_idx: int) -> Tuple[int, int]:
    """[start, stop) of a chunk: contiguous slices of ceil(total / num_chunks), as LLaVA's get_chunk."""
    size = math.ceil(total / num_chunks) if total else 0
    start = min(chunk_idx * size, total)
    return start, min(start + size, total)


def numbered_keys(base_keys: Iterable[str]) -> List[str]:
    """Make keys unique by counting repeats: MME asks two questions per image under one question_id."""
    seen: Dict[str, int] = {}
    out = []
    for key in base_keys:
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(f"{key}#{n}")
    return out


def chunk_items(entry: EntryPoint, settings: Mapping[str, Any], num_chunks: int, chunk_idx: int) -> List[Item]:
    """This chunk's items in question order, keys numbered over the whole question file."""
    items = entry.build_items(settings)
    keys = numbered_keys(item.key for item in items)
    items = [Item(key=k, text=it.text, image=it.image, fields=it.fields) for k, it in zip(keys, items)]
    start, stop = chunk_bounds(len(items), num_chunks, chunk_idx)
    return items[start:stop]


def answer_keys(entry: EntryPoint, lines: Iterable[Mapping[str, Any]]) -> List[str]:
    """Keys of a chunk file's answer lines (a question is asked once: question files with repeats are refused)."""
    return numbered_keys(entry.answer_key(line) for line in lines)


# --------------------------------------------------------------------------------------------------
# Files


def meta_path(answers_file: str) -> str:
    return answers_file + META_SUFFIX


def read_meta(answers_file: str) -> Optional[Dict[str, Any]]:
    path = meta_path(answers_file)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def lock_answers_file(answers_file: str) -> IO[str]:
    """Hold ``<answers_file>.lock`` exclusively until the returned file is closed (or the process ends).

    Two processes appending to one answers file would lose answers: the first to finish replaces the file
    and the second goes on writing to the replaced one. The second is refused instead."""
    import fcntl

    path = answers_file + LOCK_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise SetupError(f"{answers_file} is being written by another process{f' ({holder})' if holder else ''}; "
                         "wait for it to finish, or stop it, or use another --answers-file") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle


def write_meta(answers_file: str, meta: Mapping[str, Any]) -> None:
    write_atomic(meta_path(answers_file), json.dumps(meta, indent=1, sort_keys=True) + "\n")


def read_answer_lines(path: str) -> Tuple[List[Dict[str, Any]], bool]:
    """Parsed answer lines, and whether the file needs rewriting before appending to it: a cut-off last
    line (a killed run) was left out, or the last line lacks its newline."""
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    segments = raw.split("\n")
    lines: List[Dict[str, Any]] = []
    dropped = False
    for number, segment in enumerate(segments, 1):
        if not segment.strip():
            continue
        try:
            lines.append(json.loads(segment))
        except json.JSONDecodeError:
            if number == len(segments):  # last segment, no newline after it: an interrupted write
                dropped = True
                continue
            raise SetupError(f"{path}, line {number} is not valid JSON: the file is damaged; "
                             "delete it or pass --overwrite") from None
    return lines, dropped or (raw.strip() != "" and not raw.endswith("\n"))


def dumps_line(entry: EntryPoint, line: Mapping[str, Any]) -> str:
    return json.dumps(line, ensure_ascii=entry.ensure_ascii) + "\n"


def write_in_order(entry: EntryPoint, answers_file: str, items: Sequence[Item],
                   by_key: Mapping[str, Mapping[str, Any]]) -> None:
    """Rewrite the file with the answers of ``items`` that ``by_key`` holds, in the items' order."""
    write_atomic(answers_file, "".join(dumps_line(entry, by_key[i.key]) for i in items if i.key in by_key))


# --------------------------------------------------------------------------------------------------
# Resume


def existing_answers(entry: EntryPoint, answers_file: str, items: Sequence[Item], settings: Mapping[str, Any],
                     num_chunks: int, chunk_idx: int, overwrite: bool) -> Tuple[Dict[str, Dict[str, Any]], bool]:
    """(key -> answer line already there, whether the file must be rewritten before appending). Answers
    come from the file itself and from the other chunk files beside it (see answers_of_other_chunkings)."""
    if overwrite:
        # Answers of this configuration in other chunkings are as outdated as this file's: retire them, or a
        # later run with yet another --shards would reuse them.
        retire_other_chunkings(entry, answers_file, settings)
        return {}, os.path.exists(answers_file)
    done: Dict[str, Dict[str, Any]] = {}
    repaired = False
    if os.path.exists(answers_file):
        lines, repaired = read_answer_lines(answers_file)
        if lines:
            check_resumable(entry, answers_file, settings, num_chunks, chunk_idx)
            wanted = {item.key for item in items}
            for key, line in zip(answer_keys(entry, lines), lines):
                if key not in wanted:
                    raise SetupError(f"{answers_file} holds an answer ({key.rsplit('#', 1)[0]}) to a question that "
                                     "is not in this chunk: it belongs to another run; delete it or pass --overwrite")
                done[key] = line
    reused = {key: line for key, line in answers_of_other_chunkings(entry, answers_file, items, settings).items()
              if key not in done}
    return {**done, **reused}, repaired or bool(reused)


def recorded_settings(meta: Mapping[str, Any], with_chunk: bool) -> Dict[str, Any]:
    """An answers file's settings record, flat: entry point, settings and, if asked, its chunk."""
    chunk = {"num_chunks": meta.get("num_chunks"), "chunk_idx": meta.get("chunk_idx")} if with_chunk else {}
    return {"entry": meta.get("entry"), **chunk, **meta.get("settings", {})}


def settings_changes(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> List[str]:
    """What differs between two flat settings records, as 'name: theirs -> ours'."""
    return [f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)]


def check_resumable(entry: EntryPoint, answers_file: str, settings: Mapping[str, Any],
                    num_chunks: int, chunk_idx: int) -> None:
    meta = read_meta(answers_file)
    if meta is None:
        raise SetupError(f"{answers_file} already holds answers but no record of the settings that produced them "
                         f"({meta_path(answers_file)} is missing); pass --overwrite to start over")
    ours = {"entry": entry.name, "num_chunks": num_chunks, "chunk_idx": chunk_idx, **settings}
    changed = settings_changes(recorded_settings(meta, with_chunk=True), ours)
    if changed:
        raise SetupError(f"{answers_file} was produced with other settings ({'; '.join(changed)}); "
                         "pass --overwrite to discard it, or write to another --answers-file")


CHUNK_FILE_NAME = re.compile(r"(\d+)_(\d+)\.jsonl")  # the scripts' chunks/<num_chunks>_<chunk_idx>.jsonl


def answers_of_other_chunkings(entry: EntryPoint, answers_file: str, items: Sequence[Item],
                               settings: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Answers to this chunk's questions found in the chunk files of other chunkings beside ``answers_file``
    (an earlier run with another --shards or --nodes), from files produced with exactly these settings.

    Only a chunk file named like the scripts' (``<N>_<i>.jsonl``) looks at its siblings. A sibling with
    other settings, without a settings record or with unreadable lines is another configuration or damaged:
    it is left alone, and its questions are answered again."""
    if not items:
        return {}
    wanted = {item.key for item in items}
    all_keys: Optional[List[str]] = None  # built only when a sibling has our settings
    found: Dict[str, Dict[str, Any]] = {}
    for path, meta in same_settings_siblings(entry, answers_file, settings):
        if all_keys is None:
            all_keys = [item.key for item in chunk_items(entry, settings, 1, 0)]
        found.update((k, line) for k, line in sibling_answers(entry, path, meta, all_keys).items() if k in wanted)
    return found


def same_settings_siblings(entry: EntryPoint, answers_file: str,
                           settings: Mapping[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """(path, meta) of the chunk files of other chunkings beside ``answers_file`` with exactly these settings,
    oldest first, so that where two hold an answer to one question the newer one wins."""
    directory, name = os.path.split(os.path.abspath(answers_file))
    own = CHUNK_FILE_NAME.fullmatch(name)
    if own is None:
        return []
    siblings = [os.path.join(directory, other) for other in os.listdir(directory)
                if (match := CHUNK_FILE_NAME.fullmatch(other)) and match.group(1) != own.group(1)]
    chosen = []
    for path in sorted(siblings, key=lambda p: (os.path.getmtime(p), p)):
        meta = read_meta(path)
        if meta is not None and not settings_changes(recorded_settings(meta, with_chunk=False),
                                                     {"entry": entry.name, **settings}):
            chosen.append((path, meta))
    return chosen


def retire_other_chunkings(entry: EntryPoint, answers_file: str, settings: Mapping[str, Any]) -> List[str]:
    """Rename the same-settings chunk files of other chunkings (and their settings records) to
    ``<name>.overwritten``: kept for inspection, never reused. Returns the retired paths."""
    retired = []
    for path, _ in same_settings_siblings(entry, answers_file, settings):
        for old in (path, meta_path(path)):
            if os.path.exists(old):
                os.replace(old, old + ".overwritten")
        retired.append(path)
    return retired


def sibling_answers(entry: EntryPoint, path: str, meta: Mapping[str, Any],
                    all_keys: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """key -> answer line of another chunk file of the same settings; {} if it does not fit its chunk."""
    num_chunks, chunk_idx = meta.get("num_chunks"), meta.get("chunk_idx")
    if not (isinstance(num_chunks, int) and isinstance(chunk_idx, int) and 0 <= chunk_idx < num_chunks):
        return {}
    start, stop = chunk_bounds(len(all_keys), num_chunks, chunk_idx)
    chunk_keys = all_keys[start:stop]
    try:
        lines, _ = read_answer_lines(path)
        keys = answer_keys(entry, lines)
    except (OSError, SetupError, KeyError, TypeError):
        return {}
    if not set(keys) <= set(chunk_keys):
        return {}
    return dict(zip(keys, lines))


def put_in_question_order(entry: EntryPoint, answers_file: str, items: Sequence[Item]) -> None:
    """Resumed answers may come from runs in another order: rewrite the finished file in question order."""
    lines, _ = read_answer_lines(answers_file)
    by_key = dict(zip(answer_keys(entry, lines), lines))
    missing = [i.key for i in items if i.key not in by_key]
    if missing:  # cannot happen unless someone wrote to the file meanwhile
        raise RuntimeError(f"{answers_file}: {len(missing)} answers missing after the run, e.g. {missing[0]}")
    write_in_order(entry, answers_file, items, by_key)
