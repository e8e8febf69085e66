"""How well reduced tokens cover the original ones: the weighted Hausdorff distance of the paper's Table 18.

    h_w(X, Y) = max over original tokens x of  min over reduced tokens y_j of  (1 - cos(x, y_j)) / s_j

with s_j the number of original patches token j stands for (1 for a kept token). Lower is better: every
original token is close to some reduced token, and a merged token that stands for many patches may be
proportionally farther away. Computed on the projected features (what the LLM sees).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

import tokenreduction as tr
from restore.reduce import reduce_visual_tokens
from restore.settings import resolve_settings

# The three reductions of Table 18, as settings on top of base and n_vis.
REDUCTIONS: Dict[str, dict] = {
    "prune only": dict(restore=True, prune_ratio=1.0),
    "P + M uniform": dict(restore=True, anchors="uniform"),
    "P + M distinctive": dict(restore=True),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def weighted_hausdorff(original: torch.Tensor, reduced: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """h_w per sample: original [B, N, D], reduced [B, n, D], sizes [B, n] -> [B] (float32)."""
    x = torch.nn.functional.normalize(original.float(), dim=-1)
    y = torch.nn.functional.normalize(reduced.float(), dim=-1)
    cost = (1.0 - x @ y.transpose(1, 2)) / sizes.float().unsqueeze(1)  # [B, N, n]
    return cost.amin(dim=2).amax(dim=1)


@dataclass
class HausdorffRow:
    base: str
    reduction: str
    mean: float
    n_images: int


@torch.no_grad()
def hausdorff_table(token_batches: Iterable[tr.VisualTokens], bases: Sequence[str], n_vis: int) -> List[HausdorffRow]:
    """Mean h_w over every image of ``token_batches`` for each base and reduction of Table 18."""
    totals: Dict[Tuple[str, str], Tuple[float, int]] = {}
    for tokens in token_batches:
        for base in bases:
            for label, spec in REDUCTIONS.items():
                settings = resolve_settings(tr.canonical_name(base), n_vis, num_patches=tokens.num_tokens, **spec)
                reduced = reduce_visual_tokens(tokens, settings)
                h = weighted_hausdorff(tokens.features, reduced.features, reduced.sizes)
                total, count = totals.get((base, label), (0.0, 0))
                totals[base, label] = (total + float(h.sum()), count + h.shape[0])
    return [HausdorffRow(tr.canonical_name(b), label, totals[b, label][0] / totals[b, label][1], totals[b, label][1])
            for b in bases for label in REDUCTIONS]


def image_files(folder: Path, limit: int) -> List[Path]:
    """The first ``limit`` images of ``folder`` in name order (the same set on every machine)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found (GQA's images: <data-root>/gqa/data/images)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files[:limit]


def format_table(rows: Sequence[HausdorffRow]) -> str:
    reductions = list(REDUCTIONS)
    lines = ["| base | " + " | ".join(reductions) + " |", "|---|" + "---|" * len(reductions)]
    for base in dict.fromkeys(r.base for r in rows):
        cells = {r.reduction: r for r in rows if r.base == base}
        lines.append(f"| {base} | " + " | ".join(f"{cells[k].mean:.4f}" for k in reductions) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[HausdorffRow], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["base", "reduction", "weighted_hausdorff_mean", "n_images"])
        for r in rows:
            writer.writerow([r.base, r.reduction, r.mean, r.n_images])
