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

from .next_reduce import NextTokens, view_budgets


def visionzip_next_plain(tokens: NextTokens, n_vis: int) -> tr.OwnReduction:
    """The plain VisionZip row of NeXT images: raw features [I, n_vis, C] (project them), positions
    (informative: the plain row re-indexes), sizes and the source map over the 2880 sequence."""
    outs: List[VisionZipReduction] = [visionzip_reduce(view, budget)
                                      for view, budget in zip(tokens.views, view_budgets(n_vis))]
    count, n_tokens = tokens.num_images, tokens.whole.num_tokens
    device = outs[0].dominant.device
    pieces = []  # (raw features [I, n, C], positions [I, n], sizes [I, n], patches [I, m], slot in piece [I, m])

    def add(features, positions, sizes, patches=None, slots=None):
        pieces.append((features, positions, sizes.float(), patches, slots))

    base, where = outs[0], tokens.positions[0]
    n_dominant = base.dominant.shape[1]
    add(base.raw_sequence, torch.cat([where.new_zeros(count, 1), where[base.dominant], where[base.targets]], dim=1),
        torch.cat([torch.ones(count, 1 + n_dominant, device=device), base.sizes.float()], dim=1),
        torch.cat([where[base.dominant], where[base.remaining]], dim=1),
        torch.cat([1 + torch.arange(n_dominant, device=device).expand(count, -1),
                   (1 + n_dominant + base.groups).masked_fill(base.groups < 0, -1)], dim=1))

    crops, crop_where = outs[1:], tokens.positions[1:]
    dominant = torch.cat([w[out.dominant] for out, w in zip(crops, crop_where)], dim=1)
    dominant_raw = torch.cat([out.raw_sequence[:, 1:1 + out.dominant.shape[1]] for out in crops], dim=1)
    order = dominant.argsort(dim=1)  # the canvas read in raster order
    dominant = dominant.gather(1, order)
    add(dominant_raw.gather(1, order[..., None].expand(-1, -1, dominant_raw.shape[-1])), dominant,
        torch.ones(dominant.shape, device=device), dominant, torch.arange(dominant.shape[1], device=device).expand(count, -1))
    add(torch.cat([out.cls for out in crops], dim=1), torch.stack([w[0].expand(count) for w in crop_where], dim=1),
        torch.ones(count, len(crops), device=device))
    first = 0
    for out, w in zip(crops, crop_where):
        n = out.contextual.shape[1]
        add(out.contextual, w[out.targets], out.sizes, w[out.remaining],
            (first + out.groups).masked_fill(out.groups < 0, -1))
        first += n
    # Contextual tokens of all crops form one piece in the LLM's order, slots counted across crops.
    contextual = pieces[3:]
    pieces[3:] = [(torch.cat([p[0] for p in contextual], dim=1), torch.cat([p[1] for p in contextual], dim=1),
                   torch.cat([p[2] for p in contextual], dim=1), torch.cat([p[3] for p in contextual], dim=1),
                   torch.cat([p[4] for p in contextual], dim=1))]

    source = torch.full((count, n_tokens), -1, dtype=torch.long, device=device)
    offset = 0
    for features, _, _, patches, slots in pieces:
        if patches is not None:
            source.scatter_(1, patches, (slots + offset).masked_fill(slots < 0, -1))
        offset += features.shape[1]
    return tr.OwnReduction(
        features=torch.cat([p[0] for p in pieces], dim=1), space="raw",
        positions=torch.cat([p[1] for p in pieces], dim=1), sizes=torch.cat([p[2] for p in pieces], dim=1),
        source=source,
    )
