"""The shard processes of one launch: where they run, their logs, waiting for them, their progress.

Each shard is one entry-point process answering one chunk; the launcher (restore.eval.launch) decides the
commands, this module runs them and says what happened.
"""
from __future__ import annotations

import datetime
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, TextIO

from .answer_files import read_meta

# Threads of one CPU shard: a fixed number, so that --shards (which only says how the questions are cut)
# cannot change the answers; torch's CPU kernels may round differently with another thread count.
DEFAULT_CPU_THREADS_PER_SHARD = 1
PROGRESS_INTERVAL_S = 60.0
LOG_TAIL_LINES = 25


class LaunchError(Exception):
    """A problem found before any shard started (exit status 2)."""


# --------------------------------------------------------------------------------------------------
# Where shards run


def discover_gpus(device: str, env: Mapping[str, str] = os.environ,
                  which: Callable[[str], Optional[str]] = shutil.which) -> List[str]:
    """GPU ids for the shards: CUDA_VISIBLE_DEVICES when it is set (even empty: "no GPU"), else the
    indices nvidia-smi lists (not asked for --device cpu), else none."""
    if "CUDA_VISIBLE_DEVICES" in env:
        listed = env["CUDA_VISIBLE_DEVICES"].split(",")
    elif device != "cpu" and which("nvidia-smi"):
        try:
            found = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return []
        listed = found.stdout.splitlines() if found.returncode == 0 else []
    else:
        return []
    return [g for g in ("".join(x.split()) for x in listed) if g]


def cpu_threads_per_shard(env: Mapping[str, str] = os.environ) -> int:
    value = env.get("OMP_NUM_THREADS") or str(DEFAULT_CPU_THREADS_PER_SHARD)
    if not (value.isdigit() and int(value) > 0 and value[0] != "0"):
        raise LaunchError(f"OMP_NUM_THREADS must be a positive integer, got '{value}'")
    return int(value)


def require_writable_dir(directory: str, what: str) -> None:
    """Create ``directory`` if needed and fail now, not after hours of inference, when it cannot be written."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        raise LaunchError(f"cannot create the {what} {directory} (pass another one, or fix its parent)") from None
    probe = os.path.join(directory, f".write-test.{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError:
        raise LaunchError(f"the {what} {directory} is not writable (pass another one, or fix its permissions)") from None


# --------------------------------------------------------------------------------------------------
# Logs


def start_fresh_log(log: str, header: str) -> None:
    """Each attempt's log starts empty; a previous attempt's is kept beside it, named after the time it was
    last written (``<name>.log.<YYYYmmddTHHMMSS>``)."""
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    if os.path.exists(log) and os.path.getsize(log) > 0:
        stamp = datetime.datetime.fromtimestamp(os.path.getmtime(log)).strftime("%Y%m%dT%H%M%S")
        kept = f"{log}.{stamp}"
        while os.path.exists(kept):
            kept += "_"
        os.replace(log, kept)
    with open(log, "w", encoding="utf-8") as f:
        f.write(header + "\n")


def log_tail(log: str, lines: int = LOG_TAIL_LINES) -> List[str]:
    """The last lines of a log, progress bars (carriage returns) split into lines."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return [f"(cannot read the log: {e})"]
    return [line for line in text.replace("\r", "\n").split("\n") if line.strip()][-lines:]


# --------------------------------------------------------------------------------------------------
# Progress, from the answers files themselves


def answers_progress(answers_file: str, num_chunks: int, chunk_idx: int) -> Optional[tuple]:
    """(answers written, items of the chunk) of one shard's answers file; None before the shard has
    recorded what its chunk holds."""
    meta = read_meta(answers_file)
    if not meta or meta.get("num_chunks") != num_chunks or meta.get("chunk_idx") != chunk_idx:
        return None
    try:
        with open(answers_file, "rb") as f:
            written = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        written = 0
    return written, int(meta.get("n_items") or 0)


def shard_progress(answers_files: Sequence[str], num_chunks: int, chunk_idx: int) -> str:
    """"123/456" over a shard's answers files (several in a sweep), or "starting"."""
    done = total = 0
    for path in answers_files:
        found = answers_progress(path, num_chunks, chunk_idx)
        if found is None:
            return "starting"
        done, total = done + found[0], total + found[1]
    return f"{min(done, total)}/{total}"


# --------------------------------------------------------------------------------------------------
# Running them


@dataclass
class Shard:
    index: int  # on this node
    chunk: int
    num_chunks: int
    command: List[str]
    log: str
    answers_files: List[str]  # what it writes, for its progress
    env: Dict[str, str] = field(default_factory=dict)  # set for this shard only (GPU pinning, threads)

    def describe_env(self) -> str:
        """The pinning of this shard (the import path it gets is the launcher's own, not worth a line)."""
        return " ".join(f"{k}={v}" for k, v in self.env.items() if k != "PYTHONPATH")


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@dataclass
class Outcome:
    failed: List[int]  # shard indices
    wall_s: float
    interrupted: bool = False


def run_shards(shards: Sequence[Shard], label: str, progress_interval: float = PROGRESS_INTERVAL_S,
               out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> Outcome:
    """Start every shard, report each end as it happens (a failure with its log's tail), report progress
    every ``progress_interval`` seconds, and return once all have ended. SIGINT/SIGTERM stop the shards
    (what they wrote is kept) and return an interrupted outcome."""
    out, err = out or sys.stdout, err or sys.stderr
    ended: "queue.Queue[tuple]" = queue.Queue()
    procs: Dict[int, subprocess.Popen] = {}
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    failed: List[int] = []
    try:
        for shard in shards:
            with open(shard.log, "a", encoding="utf-8") as log:
                proc = subprocess.Popen(shard.command, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env={**os.environ, **shard.env})
            procs[shard.index] = proc
            # one waiter per shard: the main thread blocks on the queue, so no polling loop is needed
            threading.Thread(target=lambda s=shard, p=proc: ended.put((s, p.wait())), daemon=True).start()
            shown = shard.describe_env()
            print(f"[{label}]   shard {shard.index}: chunk {shard.chunk}{', ' + shown if shown else ''}, "
                  f"log {shard.log}", file=out, flush=True)
        running = {s.index: s for s in shards}
        next_report = time.monotonic() + progress_interval
        while running:
            try:
                shard, rc = ended.get(timeout=max(0.0, next_report - time.monotonic()))
            except queue.Empty:
                next_report = time.monotonic() + progress_interval
                line = " ".join(f"shard {s.index} {shard_progress(s.answers_files, s.num_chunks, s.chunk)}"
                                for s in running.values())
                print(f"[{label}]   progress: {line}", file=out, flush=True)
                continue
            del running[shard.index]
            if rc == 0:
                print(f"[{label}]   shard {shard.index} done ({time.monotonic() - started:.0f} s)", file=out, flush=True)
                continue
            failed.append(shard.index)
            code = rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's convention
            print(f"[{label}]   shard {shard.index} FAILED with exit code {code}; last lines of {shard.log}:",
                  file=err, flush=True)
            for line in log_tail(shard.log):
                print(f"    | {line}", file=err)
            err.flush()
    except (Interrupted, KeyboardInterrupt):
        stop(list(procs.values()))
        return Outcome(failed, time.monotonic() - started, interrupted=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return Outcome(sorted(failed), time.monotonic() - started)


def stop(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Terminate the shards still running, and kill those that do not end within ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
