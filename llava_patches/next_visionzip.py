"""Plain VisionZip on LLaVA-NeXT's fixed 2x2 layout, in the order its official NeXT code feeds the LLM.

Every view is reduced on its own with a fifth of the budget (CLS, dominant patches, contextual tokens,
as on 1.5). The base view's tokens go first as they are; then the crops' dominant patches read off the
stitched canvas, then the four crops' CLS tokens, then all their contextual tokens, crop after crop
(docs/llava_next.md, part 2). At 320 that is 64 per view (54 + 10), at 160 32 (27 + 5, by
``visionzip_split``'s ratio: the official code gives no 32-token split).
"""
from __future__ import annotations

from typing import List

import torch

import tokenreduction as tr
from tokenreduction.visionzip import VisionZipReduction, visionzip_reduce

from .next_layout import NextTokens, view_budgets


def visionzip_next_plain(tokens: NextTokens, n_vis: int) -> tr.OwnReduction:
    """The plain VisionZip row of NeXT images: raw features [I, n_vis, C] (project them), positions
    (informative: the plain row re-indexes), sizes and the source map over the 2880 sequence."""
    outs: List[VisionZipReduction] = [visionzip_reduce(view, budget)
                                      for view, budget in zip(tokens.views, view_budgets(n_vis))]
    base, crops = outs[0], outs[1:]
    where, crop_where = tokens.positions[0], tokens.positions[1:]
    count, device = tokens.num_images, base.dominant.device

    def arange(n: int, start: int = 0) -> torch.Tensor:
        return torch.arange(start, start + n, device=device).expand(count, -1)

    # The crops' dominant patches as the official code reads them: kept cells of the stitched canvas.
    dominant = torch.cat([w[out.dominant] for out, w in zip(crops, crop_where)], dim=1)
    dominant_raw = torch.cat([out.raw_sequence[:, 1:1 + out.dominant.shape[1]] for out in crops], dim=1)
    order = dominant.argsort(dim=1)
    dominant = dominant.gather(1, order)
    dominant_raw = dominant_raw.gather(1, order[..., None].expand(-1, -1, dominant_raw.shape[-1]))

    features = torch.cat([base.raw_sequence, dominant_raw, *(out.cls for out in crops),
                          *(out.contextual for out in crops)], dim=1)
    n_base, n_dominant = base.raw_sequence.shape[1], dominant.shape[1]
    # A crop's CLS token stands for no patch; it takes its crop's first patch as a position.
    positions = torch.cat([where.new_zeros(count, 1), where[base.dominant], where[base.targets], dominant,
                           torch.stack([w[0].expand(count) for w in crop_where], dim=1),
                           *(w[out.targets] for out, w in zip(crops, crop_where))], dim=1)
    sizes = torch.cat([torch.ones(count, n_base - base.sizes.shape[1], device=device), base.sizes.float(),
                       torch.ones(count, n_dominant + len(crops), device=device),
                       *(out.sizes.float() for out in crops)], dim=1)

    source = torch.full((count, tokens.whole.num_tokens), -1, dtype=torch.long, device=device)

    def merged_into(out: VisionZipReduction, w: torch.Tensor, first: int) -> None:
        # with no contextual token (a one-token budget) the remaining patches are dropped (group -1)
        source.scatter_(1, w[out.remaining], (first + out.groups).masked_fill(out.groups < 0, -1))

    source.scatter_(1, where[base.dominant], arange(base.dominant.shape[1], 1))
    merged_into(base, where, 1 + base.dominant.shape[1])
    source.scatter_(1, dominant, arange(n_dominant, n_base))
    first = n_base + n_dominant + len(crops)
    for out, w in zip(crops, crop_where):
        merged_into(out, w, first)
        first += out.contextual.shape[1]
    return tr.OwnReduction(features=features, space="raw", positions=positions, sizes=sizes, source=source)
