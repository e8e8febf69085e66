"""Analyses of what reduction and RESTORE do to one prompt: ``python -m restore.analyze attention|tokens``.

    python -m restore.analyze attention [--model-path PATH] [--image PATH | --seed S] [--question Q]
                                        [--base HoloV] [--n-vis 64] [--figure 2|5] [--setting ...] [--out DIR]
        Per decoder layer, the share of attention mass visual tokens receive (visual queries and
        the text after the image), for the full tokens, the base method alone and with RESTORE.
    python -m restore.analyze tokens [--model-path PATH] [--image PATH | --seed S] [--base HoloV]
                                     [--n-vis 64] [--restore] [--question Q] [--out DIR]
        The image as the model sees it, kept tokens outlined, merged groups coloured; for a method
        acting inside the LLM (FastV, PDrop, SparseVLM) one picture per stage of what survived it.
    python -m restore.analyze hausdorff [--model-path PATH] [--images FOLDER] [--n-images 100]
                                        [--bases HoloV,DivPrune] [--n-vis 64] [--out DIR]
        Table 18: the weighted Hausdorff distance between the original and the reduced tokens for
        prune only, prune + uniform merge and prune + distinctive merge, averaged over the images.
    python -m restore.analyze decay [--model-path PATH] [--max-distance 600] [--c 2] [--out DIR]
        Figure 3: RoPE's own decay D(d) and the calibration term c - D(d), from the model's RoPE settings.

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
from restore.jsonio import read_json
from restore.analysis import token_map as token_maps
from restore.analysis.models import DEFAULT_QUESTION, load_bench_model, load_image, prompt_inputs, visual_tokens

DEFAULT_OUT = Path("playground/analysis")
DEFAULT_GQA_IMAGES = Path("playground/data/eval/gqa/data/images")


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
    attention.add_argument("--figure", type=int, choices=(2, 5), default=None,
                           help="the paper's curves: 2 (full, re-indexed, retained, retained + calibrated) or 5 (adds "
                                "re-indexed + calibrated); default: full, base, base + RESTORE")
    attention.add_argument("--setting", action="append", default=[], metavar="LABEL=key:value,...",
                           help="an extra curve with any restore.apply settings, e.g. "
                                "'gamma 0.75=restore:true,prune_ratio:0.75' (repeatable)")
    tokens = commands.add_parser("tokens", allow_abbrev=False, help="kept and merged tokens drawn over the image")
    _common(tokens)
    tokens.add_argument("--restore", action="store_true", help="merge the unselected tokens with RESTORE")
    tokens.add_argument("--question", default=DEFAULT_QUESTION,
                        help="the prompt's question (a method acting inside the LLM scores with it)")
    hausdorff = commands.add_parser("hausdorff", allow_abbrev=False, help="weighted Hausdorff distance of reduced tokens (Table 18)")
    hausdorff.add_argument("--model-path", help="a LLaVA-1.5 checkpoint (default: the small random checkpoint)")
    hausdorff.add_argument("--images", type=Path, default=DEFAULT_GQA_IMAGES,
                           help=f"folder of images, the first --n-images by name (default {DEFAULT_GQA_IMAGES})")
    hausdorff.add_argument("--n-images", type=int, default=100)
    hausdorff.add_argument("--bases", default=None, help="comma-separated (default: every base selector)")
    hausdorff.add_argument("--base", default="HoloV", help=argparse.SUPPRESS)
    hausdorff.add_argument("--n-vis", type=int, default=64)
    hausdorff.add_argument("--device", default="auto")
    hausdorff.add_argument("--dtype", default="auto")
    hausdorff.add_argument("--out", type=Path, default=DEFAULT_OUT)
    decay = commands.add_parser("decay", allow_abbrev=False, help="RoPE decay D(d) and the calibration term c - D(d) (Figure 3)")
    decay.add_argument("--model-path", help="a LLaVA checkpoint whose config gives head dim and RoPE base "
                       "(default: LLaVA-1.5-7B's, head dim 128, base 10000)")
    decay.add_argument("--max-distance", type=int, default=600)
    decay.add_argument("--c", type=float, default=2.0, help="the calibration constant c")
    decay.add_argument("--base", default="HoloV", help=argparse.SUPPRESS)
    decay.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser


def _image_name(args) -> str:
    return Path(args.image).stem if args.image else f"seed{args.seed}"


def parse_setting(text: str) -> tuple:
    """``"label=restore:true,prune_ratio:0.75"`` -> ("label", {"restore": True, "prune_ratio": 0.75})."""
    label, sep, spec = text.partition("=")
    if not sep or not label.strip():
        raise ValueError(f"--setting expects LABEL=key:value,..., got {text!r}")
    settings: dict = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, colon, value = item.partition(":")
        if not colon:
            raise ValueError(f"--setting {label!r}: expected key:value, got {item!r}")
        if value.lower() in ("true", "false"):
            settings[key] = value.lower() == "true"
        else:
            try:
                settings[key] = float(value)
            except ValueError:
                settings[key] = value
    return label.strip(), settings


def run_attention(args) -> int:
    # Attention probabilities come from eager attention in any case (SDPA cannot return them).
    bench = load_bench_model(args.model_path, device=args.device, dtype=args.dtype, attn_implementation="eager")
    image = load_image(args.image, args.seed)
    input_ids, images, sizes = prompt_inputs(bench, image, args.question)
    base = tr.canonical_name(args.base)
    configs = attention_analysis.figure_configs(base, args.figure) if args.figure else \
        [("full", None), (base, dict(restore=False)), (f"{base}+RESTORE", dict(restore=True))]
    configs += [parse_setting(text) for text in args.setting]
    results = attention_analysis.analyse_configs(bench.model, input_ids, images, sizes, base, args.n_vis, configs)
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
    input_ids, images, _ = prompt_inputs(bench, image, args.question)
    name = tr.canonical_name(args.base)
    stem = f"tokens_{_image_name(args)}_{name}{'_restore' if args.restore else ''}_{args.n_vis}"
    if tr.acts_in(name) == "llm":  # one map per cut inside the LLM
        maps = token_maps.build_stage_token_maps(bench, input_ids, images, name, args.n_vis, args.restore)
        paths = [args.out / f"{stem}_stage{i}.png" for i in range(1, len(maps) + 1)]
    else:
        maps = [token_maps.build_token_map(bench, images, name, args.n_vis, args.restore)]
        paths = [args.out / f"{stem}.png"]
    args.out.mkdir(parents=True, exist_ok=True)
    for token_map, path in zip(maps, paths):
        token_maps.draw_token_map(token_map, path, f"{token_map.label} | image {_image_name(args)} | {bench.description}")
        sizes = token_map.group_sizes()
        covered = int((token_map.source >= 0).sum())
        print(f"{token_map.label}: {len(token_map.kept)} kept tokens, {covered} of {token_map.source.size} patches "
              f"represented, largest token {int(sizes.max())} patches")
        print(f"wrote {path}")
    return 0


def run_hausdorff(args) -> int:
    from PIL import Image

    from restore.analysis import hausdorff

    if args.n_images < 1:
        raise ValueError(f"--n-images must be at least 1, got {args.n_images}")
    bases = [tr.canonical_name(b) for b in args.bases.split(",")] if args.bases else \
        [b for b in tr.available_methods() if tr.acts_in(b) == "before_llm"]
    files = hausdorff.image_files(args.images, args.n_images)
    bench = load_bench_model(args.model_path, device=args.device, dtype=args.dtype)

    def batches():
        from tqdm import tqdm

        for path in tqdm(files, desc="images", unit="img"):  # encoded under no_grad by hausdorff_table
            _, images, _ = prompt_inputs(bench, Image.open(path).convert("RGB"))
            yield visual_tokens(bench, images)

    rows = hausdorff.hausdorff_table(batches(), bases, args.n_vis)
    table = hausdorff.format_table(rows)
    title = (f"weighted Hausdorff distance h_w (lower is better), {args.n_vis} tokens, mean over {len(files)} images "
             f"of {args.images} | {bench.description}")
    print(title)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"hausdorff_{args.n_vis}"
    stem.with_suffix(".md").write_text(title + "\n\n" + table + "\n")
    hausdorff.write_csv(rows, stem.with_suffix(".csv"))
    print(f"wrote {stem}.md, .csv")
    return 0


def rope_settings(model_path: Optional[str]) -> tuple[int, float]:
    """(head dim, RoPE base) from a checkpoint's config.json; LLaVA-1.5-7B's without one."""
    if not model_path:
        return 128, 10000.0
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass a local checkpoint folder")
    config = read_json(config_file)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return int(head_dim), float(config.get("rope_theta", 10000.0))


def run_decay(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from restore.attention import rope_decay

    if args.c <= 1:
        raise ValueError(f"--c must be above 1 (D(0) = 1), got {args.c}")
    if args.max_distance < 1:
        raise ValueError(f"--max-distance must be at least 1, got {args.max_distance}")
    head_dim, base = rope_settings(args.model_path)
    distances = torch.arange(args.max_distance + 1)
    decay = rope_decay(distances, head_dim, base)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(distances, decay, label="D(d): mean of cos(d theta_k)")
    ax.plot(distances, args.c - decay, label=f"c - D(d), c = {args.c:g}")
    ax.plot(distances, torch.log(args.c - decay), label="log(c - D(d)): the distance bias", linestyle="--")
    ax.set_xlabel("relative distance d")
    ax.set_title(f"RoPE decay and RESTORE's calibration (head dim {head_dim}, base {base:g})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decay_hd{head_dim}_c{args.c:g}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    for d in (0, 1, 10, 100, args.max_distance):
        if d <= args.max_distance:
            print(f"d = {d:4d}: D = {float(decay[d]):+.4f}, c - D = {args.c - float(decay[d]):.4f}")
    print(f"wrote {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tr.canonical_name(args.base)
        if args.command == "hausdorff":
            return run_hausdorff(args)
        if args.command == "decay":
            return run_decay(args)
        return run_attention(args) if args.command == "attention" else run_tokens(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
