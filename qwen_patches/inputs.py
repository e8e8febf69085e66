"""Model inputs of a batch of questions with images: the prompt of each, its image pads expanded to the
image's visual-token count, padded together (left, for generation, or right), with the images' pixels and
grids concatenated in the order the prompts name them, as Qwen2_5_VLForConditionalGeneration reads them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from .family import FAMILY, expand_image_tokens, visual_tokens_of_grid


def build_inputs(tokenizer: Any, image_processor: Any, model_config: Any, questions: Sequence[str],
                 images: Sequence[Optional[Any]], padding_side: str = "left") -> Dict[str, Any]:
    """input_ids, attention_mask [B, L]; pixel_values, image_grid_thw for the images that are not None."""
    import torch

    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions for {len(images)} images (pass None for a question without one)")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    merge = int(image_processor.merge_size)
    rows, pixels, grids = [], [], []
    for question, image in zip(questions, images):
        ids = FAMILY.prompt_ids(tokenizer, question, image is not None, FAMILY.default_conv_mode, model_config).tolist()
        if image is not None:
            values, grid = FAMILY.preprocess_image(image, image_processor, model_config)
            pixels.append(values)
            grids.append(grid)
            ids = expand_image_tokens(ids, model_config.image_token_id, [visual_tokens_of_grid(grid[0], merge)])
        rows.append(ids)
    input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id, padding_side)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        batch["pixel_values"] = torch.cat(pixels, dim=0)
        batch["image_grid_thw"] = torch.cat(grids, dim=0)
    return batch


def pad_rows(rows: Sequence[List[int]], pad_token_id: Optional[int], padding_side: str = "left") -> Tuple[Any, Any]:
    """(input_ids, attention_mask) [B, L] of token-id rows of different lengths, padded on one side."""
    import torch

    length = max(len(r) for r in rows)
    pad = pad_token_id if pad_token_id is not None else 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, ids in enumerate(rows):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, span] = 1
    return input_ids, attention_mask
