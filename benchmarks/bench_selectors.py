"""Time the vectorized selectors against the loop-based, official-style restatements.

    python benchmarks/bench_selectors.py [--device cpu|cuda] [--repeats N] [--batch B] [--dtype float16]

LLaVA-1.5 sizes: N = 576 visual tokens, projected width D = 4096, vision width C = 1024.
Each time is the median of --repeats runs after warm-up, selector and restatement alternating;
on a GPU, CUDA events bracket each run. --threads sets torch's CPU threads (on a busy machine,
one thread gives steadier numbers).
The "same picks" column checks that both give identical indices on the benchmark's inputs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenreduction as tr  # noqa: E402
from tokenreduction.reference import REFERENCES  # noqa: E402

N_TOKENS, WIDTH, RAW_WIDTH = 576, 4096, 1024
BUDGETS = (32, 64, 96, 192)


def make_inputs(batch: int, dtype: torch.dtype, device: torch.device, seed: int) -> tr.VisualTokens:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, N_TOKENS, WIDTH, generator=g)
    raw = torch.randn(batch, N_TOKENS, RAW_WIDTH, generator=g)
    # Peaked like a trained CLIP's CLS attention; kept in float32 as the vision tower returns it.
    attention = torch.softmax(3 * torch.randn(batch, N_TOKENS, generator=g), dim=-1)
    return tr.VisualTokens(
        features=features.to(device, dtype), raw_features=raw.to(device, dtype), cls_attention=attention.to(device)
    )


def time_ms(run: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    run()
    return (time.perf_counter() - began) * 1e3


def compare_ms(runs: List[Callable[[], torch.Tensor]], repeats: int, device: torch.device, warmup: int = 2) -> List[float]:
    """Median time of each run; the runs alternate, so load from other processes hits them alike."""
    for _ in range(warmup):
        for run in runs:
            run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times: List[List[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times):
            spent.append(time_ms(run, device))
    return [statistics.median(spent) for spent in times]


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1, help="images per call (the official code runs one at a time)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="feature dtype (default: float32 on cpu, float16 on cuda, as LLaVA runs there)")
    parser.add_argument("--methods", nargs="+", default=sorted(REFERENCES), choices=sorted(REFERENCES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be at least 1")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    tokens = make_inputs(args.batch, dtype, device, args.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"N={N_TOKENS} D={WIDTH} C={RAW_WIDTH} batch={args.batch} dtype={dtype} on {name}; "
          f"median of {args.repeats} runs")
    header = f"{'method':<10} {'n_keep':>6} {'selector ms':>12} {'reference ms':>13} {'speed-up':>9} {'same picks':>11}"
    print(header)
    print("-" * len(header))
    for method in args.methods:
        selector, reference = tr.get_selector(method), REFERENCES[method]
        for n_keep in BUDGETS:
            ours_ms, reference_ms = compare_ms(
                [lambda: selector(tokens, n_keep), lambda: reference(tokens, n_keep)], args.repeats, device
            )
            same = torch.equal(selector(tokens, n_keep), reference(tokens, n_keep))
            print(f"{method:<10} {n_keep:>6} {ours_ms:>12.2f} {reference_ms:>13.2f} "
                  f"{reference_ms / ours_ms:>8.1f}x {'yes' if same else 'NO':>11}")


if __name__ == "__main__":
    main()
