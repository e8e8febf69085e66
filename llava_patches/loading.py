"""Device- and dtype-agnostic loading of LLaVA-1.5 checkpoints, and LLaVA-style prompt inputs.

    tokenizer, model, image_processor, context_len = load_model("liuhaotian/llava-v1.5-7b")
    input_ids, images = make_inputs(tokenizer, image_processor, "What is this?", image, model_config=model.config)

``load_model`` goes through LLaVA's own ``load_pretrained_model`` (so Hugging Face names, local folders
and LLaVA's tokenizer handling behave as in LLaVA's evaluation), then puts the whole model (LLM,
projector and vision tower) on one device in one dtype. LLaVA's builder alone always loads in fp16
and leaves the vision tower where ``device_map`` put it.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2")
# model_type of LLaVA-Llama checkpoints: the released LLaVA-1.5 configs say "llava", LLaVA's code "llava_llama".
_LLAVA_LLAMA_TYPES = ("llava", "llava_llama")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded as a LLaVA-1.5 (LLaVA-Llama) model; the message says why."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" -> the current CUDA device with its index."""
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use device='cpu'.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """"auto" -> float16 on CUDA, float32 elsewhere; accepts torch dtypes and their usual names."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower() == "auto":
        resolved = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    elif isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        resolved = _DTYPE_NAMES[dtype.lower()]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32'/'fp32', 'float16'/'fp16' or 'bfloat16'/'bf16'.")
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {resolved} is not supported; use float32, float16 or bfloat16.")
    return resolved


def _is_hub_name(model_path: str) -> bool:
    """'owner/name' that is not a local path (its first component is not a local folder)."""
    return bool(_HUB_ID.fullmatch(model_path)) and not Path(model_path.split("/")[0]).exists()


def _read_config(model_path: str) -> tuple[str, dict[str, Any]]:
    """The path to give LLaVA's builder (absolute for local folders) and the checkpoint's config.json."""
    local = Path(model_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{model_path} is a file; pass the checkpoint folder (the one with config.json).")
        config_file = local / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{local} has no config.json: it is not a Hugging Face checkpoint folder.")
        return str(local.resolve()), json.loads(config_file.read_text())
    if not _is_hub_name(model_path):
        raise FileNotFoundError(
            f"checkpoint folder {model_path!r} does not exist. Pass an existing local folder or a Hugging Face "
            f"name such as 'liuhaotian/llava-v1.5-7b'."
        )
    from transformers.utils import cached_file

    try:
        config_file = cached_file(model_path, "config.json")
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{model_path!r} is neither a local folder nor a reachable Hugging Face model "
            f"(no config.json; offline, a typo, or a gated repository?): {error}"
        ) from error
    return model_path, json.loads(Path(config_file).read_text())


def _vision_tower_is_loadable(vision_tower: str) -> bool:
    # The same rule as LLaVA's build_vision_tower: an existing path or a known hub family.
    return (
        os.path.exists(vision_tower)
        or vision_tower.startswith(("openai", "laion"))
        or "ShareGPT4V" in vision_tower
    )


def check_checkpoint(model_path: str | os.PathLike) -> tuple[str, str, dict[str, Any]]:
    """Validate a LLaVA-1.5 checkpoint from its config alone, before loading any weights.

    Returns (path for LLaVA's builder, model name LLaVA's builder sees, config dict).
    Raises FileNotFoundError for a missing checkpoint and CheckpointError for one LLaVA-Llama cannot load.
    """
    from llava.mm_utils import get_model_name_from_path

    path, config = _read_config(str(model_path))
    model_type = config.get("model_type")
    if "mm_vision_tower" not in config:
        if model_type == "llava" and "vision_config" in config:
            raise CheckpointError(
                f"{model_path} is a transformers-format LLaVA (LlavaForConditionalGeneration, e.g. llava-hf/...). "
                f"This project needs the original LLaVA format, e.g. 'liuhaotian/llava-v1.5-7b'."
            )
        raise CheckpointError(
            f"{model_path} is not a LLaVA checkpoint: its config has no 'mm_vision_tower' (model_type {model_type!r})."
        )
    if model_type not in _LLAVA_LLAMA_TYPES:
        raise CheckpointError(
            f"{model_path} has model_type {model_type!r}; only LLaVA-Llama checkpoints (LLaVA-1.5, model_type "
            f"'llava' or 'llava_llama') are supported."
        )
    model_name = get_model_name_from_path(path)
    lowered = model_name.lower()
    if "llava" not in lowered:
        raise CheckpointError(
            f"LLaVA's loader decides from the model name whether a checkpoint is a LLaVA model, and {model_name!r} "
            f"does not contain 'llava'. Rename the folder so that its name contains 'llava' (e.g. 'llava-{model_name}')."
        )
    for other in ("mpt", "mistral"):
        if other in lowered:
            raise CheckpointError(
                f"the model name {model_name!r} contains {other!r}, so LLaVA's loader would build a LLaVA-{other} "
                f"model from this LLaVA-Llama checkpoint. Rename the folder without {other!r}."
            )
    vision_tower = config["mm_vision_tower"]
    if not _vision_tower_is_loadable(vision_tower):
        raise CheckpointError(
            f"the config of {model_path} names the vision tower {vision_tower!r}, which is neither an existing folder "
            f"nor a known hub name (openai/..., laion/...). If the checkpoint was moved or copied from another "
            f"machine, fix 'mm_vision_tower' in config.json (small test checkpoints: rebuild them with "
            f"`python -m restore.small_checkpoint --out <folder> --overwrite`)."
        )
    return path, model_name, config


def load_model(
    model_path: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
) -> tuple[Any, torch.nn.Module, Any, int]:
    """Load a LLaVA-1.5 checkpoint on one device in one dtype, in eval mode.

    Returns (tokenizer, model, image_processor, context_len) like LLaVA's ``load_pretrained_model``.
    device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: "auto" (float16 on CUDA, float32 on the CPU), "float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16".
    attn_implementation: None (transformers' default), "eager", "sdpa" or "flash_attention_2".
    """
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    if attn_implementation not in _ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {_ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}.")
    if target_device.type == "cpu" and target_dtype == torch.float16:
        warnings.warn(
            "float16 on the CPU works but is slow, and its results differ from a GPU's float16; "
            "use dtype='float32' on the CPU unless you need float16 specifically.",
            UserWarning,
            stacklevel=2,
        )
    path, model_name, _ = check_checkpoint(model_path)

    from llava.model.builder import load_pretrained_model

    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # A device string as device_map: the builder then loads the LLM there and also moves the vision
    # tower there (it does so only when device_map is not "auto").
    device_name = str(target_device)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        path, None, model_name, device_map=device_name, device=device_name, **extra
    )
    # The builder loads in fp16 whatever was asked: convert everything, vision tower included.
    model.to(device=target_device, dtype=target_dtype)
    model.config.torch_dtype = target_dtype
    rebuild_rope_tables(model)
    model.eval()
    return tokenizer, model, image_processor, context_len


def rebuild_rope_tables(model: torch.nn.Module) -> None:
    """Recompute every RoPE cos/sin table in float32.

    The builder instantiates the model under a float16 default dtype, so the tables hold
    fp16-rounded values that ``model.to(float32)`` cannot restore (relative logit errors ~1e-3 on the
    CPU). Stored in float32, they are cast to the activations' dtype when used, which gives exactly the
    fp16 values on a GPU and exact values in float32, as the official implementation computes them.
    """
    for module in model.modules():
        if hasattr(module, "_set_cos_sin_cache") and hasattr(module, "max_seq_len_cached"):
            device = module.inv_freq.device
            # model.to(dtype) also cast the frequencies; recompute them in float32 as the model defines them.
            module.inv_freq = 1.0 / (module.base ** (torch.arange(0, module.dim, 2, device=device).float() / module.dim))
            module._set_cos_sin_cache(module.max_seq_len_cached, device, torch.float32)


def build_prompt(question: str, conv_mode: str = "vicuna_v1", *, mm_use_im_start_end: bool = False) -> str:
    """The prompt LLaVA's evaluation scripts build: image token, newline, question, in a conversation template."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise ValueError(f"unknown conv_mode {conv_mode!r}; LLaVA knows {sorted(conv_templates)}.")
    if DEFAULT_IMAGE_TOKEN not in question:
        image_token = DEFAULT_IMAGE_TOKEN
        if mm_use_im_start_end:
            image_token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        question = image_token + "\n" + question
    conversation = conv_templates[conv_mode].copy()
    conversation.append_message(conversation.roles[0], question)
    conversation.append_message(conversation.roles[1], None)
    return conversation.get_prompt()


def make_inputs(
    tokenizer: Any,
    image_processor: Any,
    question: str,
    image: Image.Image | str | os.PathLike,
    conv_mode: str = "vicuna_v1",
    *,
    model_config: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [1, L] (with LLaVA's image placeholder id) and images [1, 3, H, W], as LLaVA's eval builds them.

    ``model_config`` supplies image_aspect_ratio and mm_use_im_start_end (default: LLaVA-1.5's "pad", False).
    Pass ``image_sizes=[image.size]`` to generate/forward alongside. ``device``/``dtype`` move the tensors
    (dtype applies to the image only).
    """
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    if model_config is None:
        model_config = SimpleNamespace(image_aspect_ratio="pad", mm_use_im_start_end=False)
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    prompt = build_prompt(question, conv_mode, mm_use_im_start_end=getattr(model_config, "mm_use_im_start_end", False))
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    images = process_images([image], image_processor, model_config)
    if device is not None:
        input_ids = input_ids.to(device)
    if device is not None or dtype is not None:
        images = images.to(device=device, dtype=dtype)
    return input_ids, images
