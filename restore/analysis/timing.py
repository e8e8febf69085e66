"""Timers (warm-up, then the median of repeats) and peak-memory meters for CPU and CUDA."""
from __future__ import annotations

import ctypes
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch


@dataclass
class Timing:
    """Seconds of each timed repeat; ``median`` is what tables report."""

    samples: List[float] = field(default_factory=list)
    last: object = None  # what the last timed call returned

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def ms(self) -> float:
        return 1e3 * self.median


class Timer:
    """Times callables on one device: ``warmup`` untimed calls, then ``repeats`` timed ones.

    On CUDA each call is bracketed by CUDA events after a synchronize, so queued kernels are
    counted where they run; on the CPU wall-clock ``perf_counter`` is used.
    """

    def __init__(self, device: torch.device, repeats: int = 3, warmup: int = 1):
        if repeats < 1 or warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
        self.device = torch.device(device)
        self.repeats = repeats
        self.warmup = warmup

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], object]) -> tuple[float, object]:
        """(seconds, result) of one call of ``fn``."""
        if self.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3, result
        started = time.perf_counter()
        result = fn()
        return time.perf_counter() - started, result

    def measure(self, fn: Callable[[], object], setup: Optional[Callable[[], None]] = None) -> Timing:
        """Time ``fn`` (``setup`` runs untimed before every call, warm-up included)."""
        timing = Timing()
        for index in range(self.warmup + self.repeats):
            if setup is not None:
                setup()
            seconds, result = self.once(fn)
            if index >= self.warmup:
                timing.samples.append(seconds)
                timing.last = result
        return timing


# --------------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in {_STATUS}")
    return int(match.group(1))


def cpu_peak_rss_supported() -> bool:
    """Linux with a resettable peak RSS (VmHWM, reset by writing 5 to /proc/self/clear_refs)."""
    try:
        _status_kib("VmHWM")
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """Give the OS back the freed heap memory glibc keeps for reuse (``malloc_trim``).

    Without it, a run that reuses memory freed by an earlier one adds no resident pages and its
    peak reads as zero. Returns False where the C library has no ``malloc_trim`` (not glibc).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory a block of code adds above what was allocated when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, the caching allocator's reserve excluded).
    CPU: growth of the process's peak resident set size (Linux VmHWM) after the freed heap is given
    back to the OS; it counts everything the process touches, not only tensors, at page granularity.
    ``bytes`` is None where that cannot be measured (not Linux with glibc).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes: Optional[int] = None
        self._start = 0

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the allocation at start"
        return "peak process RSS (VmHWM) above the RSS at start"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif trim_heap() and cpu_peak_rss_supported():
            self._start = _status_kib("VmRSS") * 1024
        else:
            self._start = -1
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start >= 0:
            self.bytes = max(0, _status_kib("VmHWM") * 1024 - self._start)
