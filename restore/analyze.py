"""Analyses of what reduction and RESTORE do to one prompt: ``python -m restore.analyze attention|tokens``.

    python -m restore.analyze attention [--model-path PATH] [--image PATH | --seed S] [--question Q]
                                        [--base HoloV] [--n-vis 64] [--out DIR]
        Per decoder layer, the share of attention mass visual tokens receive (visual queries and
        the text after the image), for the full tokens, the base method alone and with RESTORE.
    python -m restore.analyze tokens [--model-path PATH] [--image PATH | --seed S] [--base HoloV]
                                     [--n-vis 64] [--restore] [--out DIR]
        The image as the model sees it, kept tokens outlined, merged groups coloured.

Without --model-path both run on the small random checkpoint (built once under
playground/checkpoints). Outputs go to --out (default playground/analysis/).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import tokenreduction as tr
from restore.analysis import attention as attention_analysis
from restore.analysis import token_map as token_maps
from restore.analysis.models import DEFAULT_QUESTION, load_bench_model, load_image, prompt_inputs

DEFAULT_OUT = Path("playground/analysis")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", help="a LLaVA-1.5 checkpoint (default: the small random checkpoint)")
    image = parser.add_mutually_exclusive_group()
    image.add_argument("--image", help="image file")
    image.add_argument("--seed", type=int, default=0, help="seed of the synthetic image used without --image")
    parser.add_argument("--base", default="HoloV", help=f"base method: {', '.join(tr.available_selectors())}")
    parser.add_argument("--n-vis", type=int, default=64, help="visual tokens per image after reduction")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m restore.analyze", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    attention = commands.add_parser("attention", allow_abbrev=False, help="attention mass on visual tokens per layer (Figure 2)")
    _common(attention)
    attention.add_argument("--question", default=DEFAULT_QUESTION)
    tokens = commands.add_parser("tokens", allow_abbrev=False, help="kept and merged tokens drawn over the image")
    _common(tokens)
    tokens.add_argument("--restore", action="store_true", help="merge the unselected tokens with RESTORE")
    return parser


def _image_name(args) -> str:
    return Path(args.image).stem if args.image else f"seed{args.seed}"


def run_attention(args) -> int:
    # Attention probabilities come from eager attention in any case (SDPA cannot return them).
    bench = load_bench_model(args.model_path, device=args.device, dtype=args.dtype, attn_implementation="eager")
    image = load_image(args.image, args.seed)
    input_ids, images, sizes = prompt_inputs(bench, image, args.question)
    results = attention_analysis.analyse_configs(bench.model, input_ids, images, sizes, tr.canonical_name(args.base),
                                                 args.n_vis)
    title = (f"{bench.description} | image {_image_name(args)} | {tr.canonical_name(args.base)} at {args.n_vis} tokens | "
             f"mean over heads and query rows")
    table = attention_analysis.format_table(results)
    print(title)
    print("share of attention mass on visual tokens, mean over heads and query rows "
          "(visual-q: visual queries; text-q: the text after the image)")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"attention_{_image_name(args)}_{tr.canonical_name(args.base)}_{args.n_vis}"
    payload = {"model": bench.description, "image": args.image or f"synthetic seed {args.seed}",
               "question": args.question, "base": tr.canonical_name(args.base), "n_vis": args.n_vis,
               "configs": [asdict(r) for r in results]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".txt").write_text(title + "\n" + table + "\n")
    attention_analysis.plot(results, stem.with_suffix(".png"), title)
    print(f"wrote {stem}.json, .txt, .png")
    return 0


def run_tokens(args) -> int:
    bench = load_bench_model(args.model_path, device=args.device, dtype=args.dtype)
    image = load_image(args.image, args.seed)
    _, images, _ = prompt_inputs(bench, image)
    name = tr.canonical_name(args.base)
    token_map = token_maps.build_token_map(bench, images, name, args.n_vis, args.restore)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tokens_{_image_name(args)}_{name}{'_restore' if args.restore else ''}_{args.n_vis}.png"
    token_maps.draw_token_map(token_map, path, f"{token_map.label} | image {_image_name(args)} | {bench.description}")
    sizes = token_map.group_sizes()
    covered = int((token_map.source >= 0).sum())
    print(f"{token_map.label}: {len(token_map.kept)} kept tokens, {covered} of {token_map.source.size} patches "
          f"represented, largest token {int(sizes.max())} patches")
    print(f"wrote {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tr.canonical_name(args.base)
        return run_attention(args) if args.command == "attention" else run_tokens(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
