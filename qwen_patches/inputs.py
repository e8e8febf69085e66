"""Qwen2.5-VL's model inputs: the chat prompt of a question, its image pad expanded to the image's
visual-token count, the image's pixels; and ``build_inputs``, a batch of them padded together (left, for
generation, or right), pixels and grids concatenated in the order the prompts name them, as
Qwen2_5_VLForConditionalGeneration reads them. The family (family.py) builds its prompts from these.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

# The chat format of Qwen2.5-VL-Instruct (its released chat template, restated for one image and one question).
SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def conversation_prompt(text: str, has_image: bool, system: str = SYSTEM_PROMPT) -> str:
    """The Instruct model's prompt for one question: system turn, user turn (the image first), assistant turn opened."""
    user = (IMAGE_PLACEHOLDER if has_image else "") + text
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def visual_tokens_of_grid(grid_thw: Any, merge_size: int = 2) -> int:
    """Visual tokens of one image with patch grid (t, h, w): t * h * w / merge_size^2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)


def expand_image_tokens(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> List[int]:
    """``ids`` with its k-th image pad token repeated ``counts[k]`` times (one per visual token of image k)."""
    pads = [i for i, token in enumerate(ids) if token == image_token_id]
    if len(pads) != len(counts):
        raise ValueError(f"the prompt has {len(pads)} image placeholders for {len(counts)} images")
    out: List[int] = []
    image = 0
    for token in ids:
        if token == image_token_id:
            out.extend([image_token_id] * int(counts[image]))
            image += 1
        else:
            out.append(token)
    return out


def prompt_ids(tokenizer: Any, text: str, has_image: bool) -> Any:
    """Token ids [L] of one question's prompt, with ONE image pad per image (``expand_image_tokens`` repeats it)."""
    import torch

    ids = tokenizer(conversation_prompt(text, has_image), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def image_inputs(image: Any, image_processor: Any) -> Tuple[Any, Any]:
    """(pixel_values [n_patches, 3 * 2 * 14 * 14], image_grid_thw [1, 3]) of one image, as the processor makes them."""
    if getattr(image, "mode", "RGB") != "RGB":
        image = image.convert("RGB")
    batch = image_processor(images=[image], return_tensors="pt")
    return batch["pixel_values"], batch["image_grid_thw"]


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
        ids = prompt_ids(tokenizer, question, image is not None).tolist()
        if image is not None:
            values, grid = image_inputs(image, image_processor)
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
