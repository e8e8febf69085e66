"""Loading a Qwen2.5-VL checkpoint: tokenizer, model and the numpy/PIL image processor, each on its own.

``AutoProcessor`` would also build the fast image and video processors, which need torchvision; the
reference numbers of Qwen2.5-VL come from the slow ``Qwen2VLImageProcessor`` (PIL resize), which is what
this loads, from the checkpoint's preprocessor_config.json (min/max pixels, patch and merge sizes).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

from restore.families import CheckpointError

PINNED_TRANSFORMERS = "4.57.6"  # requirements-qwen.txt's, named in the error of an environment without Qwen
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


# The pixel range of the evaluation protocol the paper's Qwen2.5-VL numbers follow (lmms-eval's qwen2_5_vl:
# its default min_pixels, and the max_pixels of its reproduction script, whose MME is the paper's 2323).
EVAL_MIN_PIXELS = 256 * 28 * 28  # 200704: smaller images are enlarged to at least 256 visual tokens
EVAL_MAX_PIXELS = 16384 * 28 * 28  # 12845056, the released processor's own bound
# lmms-eval hands each image to the model as a JPEG (PIL's quality 75 up to lmms-eval 0.6, 85 from 0.7).
EVAL_JPEG_QUALITY = 75


def qwen_model_class():
    """transformers' Qwen2.5-VL model class; ImportError (with the environment to use) where it is missing."""
    try:
        from transformers import Qwen2_5_VLForConditionalGeneration
    except ImportError as error:
        import transformers

        raise ImportError(
            f"transformers {transformers.__version__} has no Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration); "
            f"Qwen2.5-VL runs in its own environment: make install-qwen, then .venv-qwen/bin/python "
            f"(transformers=={PINNED_TRANSFORMERS})") from error
    return Qwen2_5_VLForConditionalGeneration


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> Tuple[str, Any]:
    """("cuda" where there is one and device is auto, else the device; the torch dtype): auto dtype is
    bfloat16 on CUDA (Qwen2.5-VL's released dtype) and float32 on the CPU. ValueError for a CUDA device on
    a machine without one."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'.")
    if dtype == "auto":
        return device, (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(DTYPES))}")
    return device, getattr(torch, DTYPES[dtype])


def check_protocol(min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                   jpeg_quality: Optional[int] = None) -> Dict[str, int]:
    """{"min_pixels", "max_pixels", "jpeg_quality"} of the evaluation protocol, each value given replacing its
    default; ValueError for values the processor (or PIL's JPEG encoder, 1..95) cannot use."""
    low = EVAL_MIN_PIXELS if min_pixels is None else min_pixels
    high = EVAL_MAX_PIXELS if max_pixels is None else max_pixels
    quality = EVAL_JPEG_QUALITY if jpeg_quality is None else jpeg_quality
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (low, high, quality)):
        raise ValueError(f"pixel bounds and the JPEG quality are integers, got {low!r}, {high!r}, {quality!r}")
    if not 28 * 28 <= low <= high:
        raise ValueError(f"the pixel range needs 784 (one 28 x 28 px token) <= min_pixels <= max_pixels, got "
                         f"min_pixels={low}, max_pixels={high}")
    if not 0 <= quality <= 95:
        raise ValueError(f"the JPEG quality is 1..95 (0: no re-encoding), got {quality}")
    return {"min_pixels": low, "max_pixels": high, "jpeg_quality": quality}


class ProtocolImageProcessor:
    """A Qwen2VLImageProcessor that re-encodes each image as a JPEG first (lmms-eval's data URLs); every
    other attribute is the wrapped processor's."""

    def __init__(self, processor: Any, jpeg_quality: int):
        self.processor, self.jpeg_quality = processor, jpeg_quality

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        return self.processor(images=[jpeg_round_trip(image, self.jpeg_quality) for image in images], **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)


def jpeg_round_trip(image: Any, quality: int) -> Any:
    """``image`` as RGB, saved as a JPEG of ``quality`` and decoded again (quality 0: unchanged)."""
    if not quality:
        return image
    import io

    from PIL import Image

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return decoded


def load_image_processor(model_path: str, image_protocol: Optional[Mapping[str, int]] = None):
    """The checkpoint's image processor; with ``image_protocol`` its pixel range set to that one (else the
    checkpoint's preprocessor_config.json range) and, for a JPEG quality, each image re-encoded first."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    protocol = dict(image_protocol or {})
    quality = protocol.pop("jpeg_quality", 0)
    try:
        processor = Qwen2VLImageProcessor.from_pretrained(os.path.expanduser(model_path), **protocol)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"the image processor of {model_path} cannot be loaded "
                              f"(preprocessor_config.json): {error}") from None
    return ProtocolImageProcessor(processor, quality) if quality else processor


def load_model(model_path: str, *, model_base: Optional[str] = None, device: str = "auto", dtype: str = "auto",
               attn_implementation: str = "sdpa", image_protocol: Optional[Mapping[str, int]] = None):
    """(tokenizer, model in eval mode, image processor) of a Qwen2.5-VL checkpoint (local folder or hub name)."""
    if model_base is not None:
        raise CheckpointError("--model-base is LLaVA's notion (LoRA / projector-only checkpoints); "
                              "a Qwen2.5-VL checkpoint loads on its own")
    from transformers import AutoTokenizer

    path = os.path.expanduser(model_path)
    device, torch_dtype = resolve_device_dtype(device, dtype)
    model_cls = qwen_model_class()
    model = model_cls.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, model, load_image_processor(path, image_protocol)
