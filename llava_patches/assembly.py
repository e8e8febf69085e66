"""LLaVA's multimodal input assembly, written once for every reduction method.

Stock LLaVA splices image features into the embedded prompt in ``prepare_inputs_labels_for_multimodal``;
the official RESTORE code carries a copy of it per base method. Here one function does it and also
returns the :class:`SequenceLayout` that RESTORE needs later: each token's position id and size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class ImageTokens:
    """What one image contributes: features [n, D], retained patch positions [n], sizes [n]."""

    features: torch.Tensor
    positions: torch.Tensor
    sizes: torch.Tensor


@dataclass
class SequenceLayout:
    """Per-token facts about an assembled batch, in its padded layout [B, L]."""

    positions: torch.Tensor  # position id of every token
    sizes: torch.Tensor  # float32 number of original patches (1 for text and padding)
    is_visual: torch.Tensor  # bool
    valid: torch.Tensor  # bool, False on padding
    next_position: torch.Tensor  # [B] position id of the first token generated after this prefill
    max_next: int  # the largest next_position, as a Python int (no device read needed)
    fresh: bool = True  # set until the LLM has consumed it in a prefill

    def rope_length(self, past_length: int, q_len: int) -> int:
        """An upper bound of the position ids of a forward, known without reading the GPU."""
        return self.max_next + max(past_length + q_len - self.length, 0)

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def repeat_samples(self, times: int) -> "SequenceLayout":
        """Each sample repeated ``times`` times in a row, as generate() expands a batch for beams or
        several returned sequences (repeats share one prompt, so beam reordering cannot mix them up)."""
        fields = ("positions", "sizes", "is_visual", "valid", "next_position")
        repeated = {f: getattr(self, f).repeat_interleave(times, dim=0) for f in fields}
        return SequenceLayout(**repeated, max_next=self.max_next, fresh=self.fresh)

    def decode_positions(self, past_length: int, q_len: int) -> torch.Tensor:
        """Position ids of ``q_len`` new tokens after ``past_length`` cached ones (one per step and sample)."""
        steps = torch.arange(q_len, device=self.positions.device) + (past_length - self.length)
        return self.next_position.unsqueeze(1) + steps


def split_images(images) -> torch.Tensor:
    """LLaVA-1.5 images as one [I, 3, H, W] tensor, one entry per ``<image>`` placeholder."""
    if isinstance(images, (list, tuple)):
        images = [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
        crops = max(x.shape[0] for x in images)
        images = torch.cat(images, dim=0)
    else:
        crops = images.shape[1] if images.ndim == 5 else 1
        images = images.flatten(0, 1) if images.ndim == 5 else images
    if crops > 1:
        raise NotImplementedError("token reduction supports one crop per image (LLaVA-1.5); "
                                  "multi-crop (anyres) images are not supported")
    return images


def assemble(
    embed_tokens: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    images: Sequence[ImageTokens],
    *,
    num_patches: int,
    retain_positions: bool,
    padding_side: str = "right",
    max_length: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], SequenceLayout]:
    """Embed the prompt and put each image's tokens where its ``<image>`` placeholder was.

    Returns (inputs_embeds [B, L, D], attention_mask or None, labels or None, layout), padded like
    stock LLaVA (side from the model config). With ``retain_positions`` every image occupies
    ``num_patches`` position ids (its tokens keep their patch positions) and the text after it keeps
    the positions it has in the unreduced sequence; otherwise positions are contiguous.
    As in stock LLaVA, a sample without a placeholder still consumes one entry of ``images``.
    """
    device = input_ids.device
    valid_in = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    labels_in = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
    text_embeds = embed_tokens(input_ids.clamp(min=0))

    rows: List[dict] = []
    image_iter = iter(images)
    for b in range(input_ids.shape[0]):
        ids, embeds, labs = input_ids[b][valid_in[b]], text_embeds[b][valid_in[b]], labels_in[b][valid_in[b]]
        slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if not slots:
            next(image_iter, None)
        pieces, cursor, start = [], 0, 0
        for slot in slots + [ids.shape[0]]:
            n_text = slot - start
            pieces.append((embeds[start:slot], labs[start:slot], torch.arange(cursor, cursor + n_text, device=device),
                           torch.ones(n_text, device=device), torch.zeros(n_text, dtype=torch.bool, device=device)))
            cursor += n_text
            if slot < ids.shape[0]:
                image = next(image_iter, None)
                if image is None:
                    raise ValueError(f"the prompts have more <image> placeholders than the {len(images)} images given")
                n_img = image.features.shape[0]
                pos = cursor + (image.positions.to(device) if retain_positions else torch.arange(n_img, device=device))
                pieces.append((image.features.to(device=device, dtype=embeds.dtype),
                               torch.full((n_img,), IGNORE_INDEX, dtype=labs.dtype, device=device), pos,
                               image.sizes.to(device=device, dtype=torch.float32),
                               torch.ones(n_img, dtype=torch.bool, device=device)))
                cursor += num_patches if retain_positions else n_img
            start = slot + 1
        row = {k: torch.cat([p[i] for p in pieces]) for i, k in enumerate(("embeds", "labels", "positions", "sizes", "visual"))}
        if max_length is not None and row["embeds"].shape[0] > max_length:
            # Stock LLaVA cuts the assembled sequence at tokenizer_model_max_length; every per-token
            # field is cut with it, and generation continues after the last position that survived.
            row = {k: v[:max_length] for k, v in row.items()}
            cursor = int(row["positions"].max()) + 1 if max_length > 0 else 0
        row["next"] = cursor
        rows.append(row)

    B, L = len(rows), max(r["embeds"].shape[0] for r in rows)
    D = rows[0]["embeds"].shape[1]
    embeds_out = text_embeds.new_zeros(B, L, D)
    labels_out = torch.full((B, L), IGNORE_INDEX, dtype=labels_in.dtype, device=device)
    positions = torch.zeros(B, L, dtype=torch.long, device=device)
    sizes = torch.ones(B, L, device=device)
    visual = torch.zeros(B, L, dtype=torch.bool, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        n = row["embeds"].shape[0]
        span = slice(L - n, L) if padding_side == "left" else slice(0, n)
        embeds_out[b, span] = row["embeds"]
        labels_out[b, span] = row["labels"]
        positions[b, span] = row["positions"]
        sizes[b, span] = row["sizes"]
        visual[b, span] = row["visual"]
        valid[b, span] = True

    layout = SequenceLayout(
        positions=positions, sizes=sizes, is_visual=visual, valid=valid,
        next_position=torch.tensor([r["next"] for r in rows], device=device),
        max_next=max(r["next"] for r in rows),
    )
    mask_out = None if attention_mask is None else valid.to(attention_mask.dtype)
    return embeds_out, mask_out, (None if labels is None else labels_out), layout
