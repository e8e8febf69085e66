"""Cutting visual tokens inside the LLM, one stage at a time: pure tensor functions, no model code.

A method acting in the LLM (``tokenreduction.inllm``) scores each image's current visual tokens at a
stage; here the tokens are cut and the sequence rebuilt:

* :func:`stage_choice` decides, per image, which tokens stay and which merge: the method's own choice for
  its plain row, or RESTORE's (``int(gamma * budget)`` kept by the method's score, the others merged into
  ``budget - kept`` groups around anchors on that layer's hidden states);
* :func:`apply_choice` builds the image's new tokens: kept ones as they are, a group as the size-weighted
  mean of its members (sizes accumulate across stages), each token at a position taken from the original
  patches it stands for (``merged_position``, the median by default; a kept token keeps its own);
* :func:`rebuild_sequence` puts each sample's new visual tokens where its image was, keeps its text, and
  pads the batch again on the same side, giving the layout (positions, sizes, validity) of the later layers.

Every sample is cut on its own, so a batch gives each sample what it gets alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from tokenreduction.inllm import InLLMMethod, StageChoice, StageView

from .merge import anchor_merge, complement, group_positions
from .settings import ReductionSettings


@dataclass
class ImageTrack:
    """One image's visual tokens as they go through the stages (n tokens now, N original patches)."""

    sample: int  # its row in the batch
    patch_positions: torch.Tensor  # [N] position id of each original patch (before any cut)
    source: torch.Tensor  # [N] the token (0..n-1) each patch is in now, -1 once dropped
    positions: torch.Tensor  # [n] retained position id of each token (ascending unless placed after_kept)
    sizes: torch.Tensor  # [n] float32 original patches in each token

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


def start_track(sample: int, positions: torch.Tensor) -> ImageTrack:
    """An image before any cut: one token per patch at ``positions`` [N]."""
    N = positions.shape[0]
    return ImageTrack(sample, positions.clone(), torch.arange(N, device=positions.device), positions.clone(),
                      torch.ones(N, device=positions.device))


def stage_choice(method: InLLMMethod, view: StageView, settings: ReductionSettings) -> StageChoice:
    """The cut of one image: the method's own (its plain row), or RESTORE's hybrid of keeping and merging."""
    n = view.visual_index.shape[0]
    if view.budget >= n:
        return StageChoice(keep=torch.arange(n, device=view.visual_index.device))
    if settings.anchors == "none":  # prune only: the method decides, as in its official code
        return method.plain_choice(view)
    n_keep = int(view.budget * settings.prune_ratio)
    scores = method.scores(view)
    keep = scores.topk(n_keep).indices if n_keep else scores.new_empty(0, dtype=torch.long)
    rest = complement(keep.unsqueeze(0), n)[0]
    n_groups = view.budget - n_keep
    if n_groups == 0:  # gamma = 1: prune only, by the method's score
        return StageChoice(keep=keep)
    members = view.hidden[view.visual_index[rest]].unsqueeze(0)
    groups = anchor_merge(members, n_groups, anchor_rule=settings.anchors)
    return StageChoice(keep=keep, merged_members=rest, group_of=groups.group_of[0], n_groups=n_groups)


def apply_choice(track: ImageTrack, choice: StageChoice, hidden: torch.Tensor, merged_position: str = "median",
                 placement: str = "by_position") -> Tuple[torch.Tensor, ImageTrack]:
    """The image's new tokens [b, D] and its track after the cut.

    ``hidden`` [n, D]: the image's current tokens' hidden states. ``placement`` (``MERGED_PLACEMENTS``):
    ``by_position`` orders every token by its position id; ``after_kept`` keeps the kept tokens in their
    order, followed by the merged ones in group order (SparseVLM's recycled tokens).
    """
    n, D = hidden.shape
    device = hidden.device
    keep = choice.keep.to(device)
    k = keep.shape[0]
    slot_of = torch.full((n,), -1, dtype=torch.long, device=device)
    slot_of[keep] = torch.arange(k, device=device)
    features, sizes = hidden[keep], track.sizes[keep]
    if choice.n_groups:
        members, group_of = choice.merged_members.to(device), choice.group_of.to(device)
        slot_of[members] = k + group_of
        assign = torch.nn.functional.one_hot(group_of, choice.n_groups).float()  # [m, g]
        member_sizes = track.sizes[members]
        group_sizes = assign.t() @ member_sizes
        if choice.merged_features is not None:
            merged = choice.merged_features.to(hidden.dtype)
        else:  # one-hot matmul rather than scatter_add: deterministic on every device
            merged = (assign.t() @ (hidden[members].float() * member_sizes.unsqueeze(-1))) / group_sizes.unsqueeze(-1)
            merged = merged.to(hidden.dtype)
        features = torch.cat([features, merged])
        sizes = torch.cat([sizes, group_sizes])
    b = features.shape[0]
    source = torch.where(track.source >= 0, slot_of[track.source.clamp(min=0)], track.source)
    alive = source >= 0
    positions = group_positions(track.patch_positions[alive].unsqueeze(0), source[alive].unsqueeze(0), b,
                                merged_position)[0]
    if not choice.n_groups:  # nothing merged: every token keeps the position it had
        positions = track.positions[keep]
    if placement == "after_kept":
        order = torch.cat([keep.sort(stable=True).indices, torch.arange(k, b, device=device)])
    else:
        order = positions.sort(stable=True).indices
    rank = order.argsort()
    new_source = torch.where(alive, rank[source.clamp(min=0)], source)
    return features[order], ImageTrack(track.sample, track.patch_positions, new_source, positions[order], sizes[order])


@dataclass
class StageLayout:
    """The padded layout [B, L] of the sequence one group of decoder layers sees."""

    positions: torch.Tensor  # position id of every token
    sizes: torch.Tensor  # float32 original patches each token stands for (1 for text and padding)
    is_visual: torch.Tensor  # bool
    valid: torch.Tensor  # bool, False on padding
    next_position: torch.Tensor  # [B] position id of the first generated token
    padding_side: str

    @property
    def length(self) -> int:
        return int(self.positions.shape[1])

    def decode_positions(self, generated: int, q_len: int) -> torch.Tensor:
        """Position ids [B, q_len] of new tokens after ``generated`` already generated ones."""
        steps = torch.arange(q_len, device=self.positions.device) + generated
        return self.next_position.unsqueeze(1) + steps


def image_spans(layout: StageLayout, tracks: Sequence[ImageTrack]) -> List[torch.Tensor]:
    """For every image (in track order), the sequence indices [n] of its current visual tokens.

    A sample's visual tokens are its images' tokens in image order, each image contiguous.
    """
    visual = {}
    taken = {}
    spans: List[torch.Tensor] = []
    for track in tracks:
        b = track.sample
        if b not in visual:
            visual[b] = (layout.is_visual[b] & layout.valid[b]).nonzero().flatten()
        start = taken.get(b, 0)
        spans.append(visual[b][start:start + track.num_tokens])
        taken[b] = start + track.num_tokens
    return spans


def rebuild_sequence(hidden: torch.Tensor, layout: StageLayout, spans: Sequence[torch.Tensor],
                     new_tokens: Sequence[torch.Tensor], tracks: Sequence[ImageTrack], reindex: bool
                     ) -> Tuple[torch.Tensor, StageLayout, List[torch.Tensor]]:
    """Replace each image's span by its new tokens, keep the text, pad again on the layout's side.

    Returns (hidden [B, L', D], the new layout, each image's new span). ``reindex``: positions are
    contiguous in the new sequence (PDrop's plain row); otherwise each token keeps its retained id.
    """
    B, L, D = hidden.shape
    device = hidden.device
    rows = []
    for b in range(B):
        text = (layout.valid[b] & ~layout.is_visual[b]).nonzero().flatten()
        keys = [text.float()]
        feats, pos, sizes, visual = [hidden[b, text]], [layout.positions[b, text]], [layout.sizes[b, text]], \
            [torch.zeros_like(text, dtype=torch.bool)]
        for span, tokens, track in zip(spans, new_tokens, tracks):
            if track.sample != b:
                continue
            # The new tokens take the first slots of the image's old span: text order is untouched.
            keys.append(span[0].float() + torch.arange(tokens.shape[0], device=device).float())
            feats.append(tokens)
            pos.append(track.positions)
            sizes.append(track.sizes)
            visual.append(torch.ones(tokens.shape[0], dtype=torch.bool, device=device))
        order = torch.cat(keys).argsort()
        rows.append(dict(feats=torch.cat(feats)[order], pos=torch.cat(pos)[order], sizes=torch.cat(sizes)[order],
                         visual=torch.cat(visual)[order], next=layout.next_position[b]))
    L2 = max(r["feats"].shape[0] for r in rows)
    out = hidden.new_zeros(B, L2, D)
    positions = torch.zeros(B, L2, dtype=torch.long, device=device)
    sizes = torch.ones(B, L2, device=device)
    is_visual = torch.zeros(B, L2, dtype=torch.bool, device=device)
    valid = torch.zeros(B, L2, dtype=torch.bool, device=device)
    next_position = layout.next_position.clone()
    for b, row in enumerate(rows):
        n = row["feats"].shape[0]
        span = slice(L2 - n, L2) if layout.padding_side == "left" else slice(0, n)
        out[b, span] = row["feats"]
        positions[b, span] = torch.arange(n, device=device) if reindex else row["pos"]
        sizes[b, span] = row["sizes"]
        is_visual[b, span] = row["visual"]
        valid[b, span] = True
        if reindex:
            next_position[b] = n
    new_layout = StageLayout(positions, sizes, is_visual, valid, next_position, layout.padding_side)
    return out, new_layout, image_spans(new_layout, tracks)
