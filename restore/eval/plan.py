"""Everything an evaluation run decides and checks before the model loads.

Parse and validate every argument, read the questions, take this process's chunk, reconcile with an
existing answers file (resume) and open and decode every image still to be answered, so that any problem
with the arguments or the data comes back at once, not after minutes of loading or hours of generating.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .answer_files import chunk_items, existing_answers, lock_answers_file
from .arguments import check_arguments, expand_configs
from .entry_point import EntryPoint, ImageRef, Item, SetupError


@dataclass
class Plan:
    """Everything decided before the model loads."""

    entry: EntryPoint
    args: argparse.Namespace
    settings: Dict[str, Any]
    num_chunks: int
    chunk_idx: int
    answers_file: str
    items: List[Item]  # this chunk, question order (keys numbered)
    done: Dict[str, Dict[str, Any]]  # key -> existing answer line
    pending: List[Item]
    repaired: bool  # the answers file must be rewritten (cut-off line, overwrite)
    lock: Optional[IO[str]] = None  # held while this process owns the answers file; see release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @property
    def chunk_label(self) -> str:
        return f"chunk {self.chunk_idx + 1}/{self.num_chunks}"


def plan_run(entry: EntryPoint, args: argparse.Namespace, env: Mapping[str, str] = os.environ,
             items: Optional[List[Item]] = None) -> Plan:
    """Validate everything that can be checked without the model (images aside: see check_images).

    ``items``: this chunk's items when another configuration of the same questions has read them already
    (the reduction does not change which questions a chunk holds)."""
    settings, num_chunks, chunk_idx = check_arguments(entry, args, env)
    if items is None:
        items = chunk_items(entry, settings, num_chunks, chunk_idx)
    answers_file = os.path.expanduser(args.answers_file)
    lock = lock_answers_file(answers_file)  # before reading it: another writer may be appending
    try:
        done, repaired = existing_answers(entry, answers_file, items, settings, num_chunks, chunk_idx,
                                          args.overwrite)
    except BaseException:
        lock.close()
        raise
    pending = [item for item in items if item.key not in done]
    return Plan(entry, args, settings, num_chunks, chunk_idx, answers_file, items, done, pending, repaired, lock)


def plan_runs(entry: EntryPoint, args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> List[Plan]:
    """One plan per configuration (``--configs``; else the flags' one), each exactly the plan of a separate
    run of that configuration: its own answers file, lock and resume state. A problem with any
    configuration stops them all before the model loads."""
    plans: List[Plan] = []
    try:
        for tag, one in expand_configs(args):
            try:
                plans.append(plan_run(entry, one, env, plans[0].items if plans else None))
            except SetupError as e:
                raise SetupError(f"{tag}: {e}" if tag else str(e)) from None
    except BaseException:
        for plan in plans:
            plan.release()
        raise
    return plans


def check_only(entry: EntryPoint, args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> int:
    """The checks of plan_run that touch no answers file (arguments, plugins, the question file) for every
    configuration; the number of items of this chunk. Lets a script refuse a bad command once, before it
    starts any shard."""
    n_items = None
    for tag, one in expand_configs(args):
        try:
            settings, num_chunks, chunk_idx = check_arguments(entry, one, env)
        except SetupError as e:
            raise SetupError(f"{tag}: {e}" if tag else str(e)) from None
        if n_items is None:  # the questions are the same for every configuration: read them once
            n_items = len(chunk_items(entry, settings, num_chunks, chunk_idx))
    return n_items


def check_images(items: Sequence[Item], decode: bool = True,
                 preprocess: Optional[Callable[[Any], Any]] = None) -> None:
    """Every pending image exists, decodes and (given ``preprocess``, what inference does to an image)
    preprocesses; lists the first few that do not."""
    missing = [it.image.path for it in items if it.image and it.image.path and not os.path.isfile(it.image.path)]
    missing = list(dict.fromkeys(missing))
    if missing:
        raise SetupError(f"{len(missing)} image(s) of this chunk not found:{_first_five(missing)}")
    if not decode:
        return
    refs = list(dict.fromkeys(it.image for it in items if it.image is not None))
    if not refs:
        return
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    tried = _PreprocessedShapes(preprocess)

    def try_image(ref: ImageRef) -> Optional[str]:
        try:
            image = ref.open()
        except Exception as e:  # PIL raises many types for bad files
            return f"{ref.path or ref.label}: cannot be decoded: {type(e).__name__}: {e}"
        problem = tried.problem(image)
        return None if problem is None else f"{ref.path or ref.label}: {problem}"

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # decoding releases the GIL
        problems = [p for p in tqdm(pool.map(try_image, refs), total=len(refs), desc="checking images",
                                    disable=len(refs) < 50, mininterval=progress_interval()) if p]
    if problems:
        raise SetupError(f"{len(problems)} image(s) of this chunk cannot be decoded or preprocessed "
                         f"(remove or replace them):{_first_five(problems)}")


class _PreprocessedShapes:
    """Runs ``preprocess`` once per distinct (mode, size, transparency) of image.

    Whether the image processor fails depends on those alone, never on the pixel values (the 1x1 image
    whose channel axis it cannot tell apart is one case), so a dataset's many photos of one size cost one
    preprocessing, not one each."""

    def __init__(self, preprocess: Optional[Callable[[Any], Any]]):
        self.preprocess = preprocess
        self.outcomes: Dict[Tuple[Any, ...], Optional[str]] = {}
        self.lock = threading.Lock()

    def problem(self, image: Any) -> Optional[str]:
        """None when the image preprocesses, else what went wrong."""
        if self.preprocess is None:
            return None
        shape = (image.mode, image.size, "transparency" in image.info)
        with self.lock:
            if shape in self.outcomes:
                return self.outcomes[shape]
        try:
            self.preprocess(image)
            outcome = None
        except Exception as e:  # the processor's errors are ValueError, TypeError, IndexError...
            width, height = image.size
            outcome = (f"cannot be preprocessed for the model ({width}x{height} pixels, mode {image.mode}): "
                       f"{type(e).__name__}: {e}")
        with self.lock:
            self.outcomes[shape] = outcome
        return outcome


def _first_five(problems: Sequence[str]) -> str:
    shown = "\n  " + "\n  ".join(problems[:5])
    return shown + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")


def progress_interval() -> float:
    """Seconds between tqdm updates: a log file gets a line every 30 s, not a flood."""
    return 0.1 if sys.stderr.isatty() else 30.0
