"""Loading a Qwen2.5-VL checkpoint: tokenizer, model and the numpy/PIL image processor, each on its own.

``AutoProcessor`` would also build the fast image and video processors, which need torchvision; the
reference numbers of Qwen2.5-VL come from the slow ``Qwen2VLImageProcessor`` (PIL resize), which is what
this loads, from the checkpoint's preprocessor_config.json (min/max pixels, patch and merge sizes).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

from restore.families import CheckpointError

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> Tuple[str, Any]:
    """("cuda" where there is one and device is auto, else the device; the torch dtype): auto dtype is
    bfloat16 on CUDA (Qwen2.5-VL's released dtype) and float32 on the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(DTYPES))}")
    return device, getattr(torch, DTYPES[dtype])


def load_image_processor(model_path: str):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    try:
        return Qwen2VLImageProcessor.from_pretrained(os.path.expanduser(model_path))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"the image processor of {model_path} cannot be loaded "
                              f"(preprocessor_config.json): {error}") from None


def load_model(model_path: str, *, model_base: Optional[str] = None, device: str = "auto", dtype: str = "auto",
               attn_implementation: str = "sdpa"):
    """(tokenizer, model in eval mode, image processor) of a Qwen2.5-VL checkpoint (local folder or hub name)."""
    if model_base is not None:
        raise CheckpointError("--model-base is LLaVA's notion (LoRA / projector-only checkpoints); "
                              "a Qwen2.5-VL checkpoint loads on its own")
    from transformers import AutoTokenizer

    from .family import _qwen_classes

    path = os.path.expanduser(model_path)
    device, torch_dtype = resolve_device_dtype(device, dtype)
    model_cls = _qwen_classes()
    model = model_cls.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, model, load_image_processor(path)
