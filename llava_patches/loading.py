"""Device- and dtype-agnostic loading of LLaVA-1.5 checkpoints, and LLaVA-style prompt inputs.

    tokenizer, model, image_processor, context_len = load_model("liuhaotian/llava-v1.5-7b")
    input_ids, images = make_inputs(tokenizer, image_processor, "What is this?", image, model_config=model.config)

``load_model`` goes through LLaVA's own ``load_pretrained_model`` (so Hugging Face names, local folders,
``model_base`` checkpoints and LLaVA's tokenizer handling behave as in LLaVA's evaluation) and then puts
the LLM and projector on one device in one dtype. The CLIP tower stays in float32, as LLaVA's evaluation
leaves it (its builder loads the tower with device_map="auto" and no dtype); pixels are cast to the
tower's dtype and its features back to the pixels' dtype by the tower itself.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
from PIL import Image

from restore.families import CheckpointError, read_checkpoint_config  # noqa: F401 (CheckpointError: part of this module's API)
from restore.jsonio import read_json

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
# The dtype LLaVA's evaluation runs the CLIP tower in, whatever the LLM's (see the module docstring).
VISION_TOWER_DTYPE = torch.float32
_PICKLE_PROTOCOL_MARK = 0x80  # first byte of a legacy (non-zip) torch.save file


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


def _vision_tower_is_loadable(vision_tower: str) -> bool:
    # The same rule as LLaVA's build_vision_tower: an existing path or a known hub family.
    return (
        os.path.exists(vision_tower)
        or vision_tower.startswith(("openai", "laion"))
        or "ShareGPT4V" in vision_tower
    )


def _check_weight_file(path: Path) -> None:
    """Read just enough of a weights file to tell a complete one from a truncated or foreign one."""
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):  # checks the header against the file size
                pass
        elif zipfile.is_zipfile(path):  # torch.save's format: the central directory sits at the end
            with zipfile.ZipFile(path):
                pass
        else:
            with path.open("rb") as handle:
                if handle.read(1) != bytes([_PICKLE_PROTOCOL_MARK]):
                    raise ValueError("neither a zip archive (torch.save) nor a pickle: truncated or not a weights file")
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as error:
        raise CheckpointError(
            f"the weights file {path} is corrupt or incomplete ({error}). Copy or download it again (an "
            f"interrupted download leaves such files), or rebuild a small test checkpoint with "
            f"`python -m restore.small_checkpoint --out <folder> --overwrite`."
        ) from error


def _check_shard_index(index_file: Path) -> None:
    shards = sorted(set(read_json(index_file).get("weight_map", {}).values()))
    missing = [name for name in shards if not (index_file.parent / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_file} lists weight shards that are not in {index_file.parent}: {', '.join(missing)}. "
            f"Copy or download the missing files."
        )


def check_weight_files(folder: str | os.PathLike) -> None:
    """Raise CheckpointError, naming the file, if a weights file of a local ``folder`` is unreadable.

    Only headers are read (a few bytes per file), so this runs before any weights are loaded.
    """
    folder = Path(folder)
    for index_file in sorted(folder.glob("*.index.json")):
        _check_shard_index(index_file)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin"):
            _check_weight_file(path)


def check_checkpoint(model_path: str | os.PathLike) -> tuple[str, str, dict[str, Any]]:
    """Validate a LLaVA-1.5 checkpoint from its config alone, before loading any weights.

    Returns (path for LLaVA's builder, model name LLaVA's builder sees, config dict).
    Raises FileNotFoundError for a missing checkpoint and CheckpointError for one LLaVA-Llama cannot load.
    """
    from llava.mm_utils import get_model_name_from_path

    path, config = read_checkpoint_config(str(model_path))
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
    for folder in (path, vision_tower):
        if os.path.isdir(folder):
            check_weight_files(folder)
    return path, model_name, config


def _check_model_base(model_base: str | os.PathLike) -> str:
    """The path LLaVA's builder should get for ``model_base`` (the base LLM of LoRA / projector-only checkpoints)."""
    path, _ = read_checkpoint_config(str(model_base))
    if os.path.isdir(path):
        check_weight_files(path)
    return path


def load_model(
    model_path: str | os.PathLike,
    *,
    model_base: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
) -> tuple[Any, torch.nn.Module, Any, int]:
    """Load a LLaVA-1.5 checkpoint on one device, the LLM and projector in one dtype, in eval mode.

    Returns (tokenizer, model, image_processor, context_len) like LLaVA's ``load_pretrained_model``.
    model_base: the base LLM of a LoRA or projector-only checkpoint, as LLaVA's ``--model-base``.
    device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: "auto" (float16 on CUDA, float32 on the CPU), "float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16".
        The CLIP tower stays in float32 whatever the dtype, as in LLaVA's evaluation.
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
    base_path = None if model_base is None else _check_model_base(model_base)

    from llava.model.builder import load_pretrained_model

    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # device_map="auto", as LLaVA's evaluation calls the builder, is what leaves the CLIP tower in
    # float32; any device other than the literal "cuda" still puts the LLM on that one device.
    with _readable_weights(path):
        tokenizer, model, image_processor, context_len = load_pretrained_model(
            path, base_path, model_name, device_map="auto", device=str(target_device), **extra
        )
    _place_language_model(model, target_device, target_dtype)
    _place_vision_tower(model.get_vision_tower(), target_device)
    model.config.torch_dtype = target_dtype
    rebuild_rope_tables(model)
    model.eval()
    return tokenizer, model, image_processor, context_len


@contextmanager
def _readable_weights(model_path: str) -> Iterator[None]:
    """Turn a weights file that cannot be deserialised (e.g. in the hub cache) into a CheckpointError."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(
            f"a weights file of {model_path} cannot be read ({error}); it is corrupt or incomplete. For a hub "
            f"model, delete it from the Hugging Face cache (`huggingface-cli delete-cache`) and download it "
            f"again; for a local folder, copy it again."
        ) from error


def _place_language_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """LLM, projector and lm_head to ``device`` in ``dtype``, the vision tower untouched."""
    llm = model.get_model()
    tower = llm._modules.pop("vision_tower", None)  # detached so that .to(dtype) cannot round it
    try:
        model.to(device=device, dtype=dtype)
    finally:
        if tower is not None:
            llm._modules["vision_tower"] = tower


def _place_vision_tower(vision_tower: torch.nn.Module, device: torch.device) -> None:
    """The CLIP tower on ``device`` in float32 (device_map="auto" may have spread it over several GPUs)."""
    clip = vision_tower.vision_tower
    if len(set(getattr(clip, "hf_device_map", {}).values())) > 1:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(clip, recurse=True)
    clip.to(device=device, dtype=VISION_TOWER_DTYPE)


def stock_inv_freq(base: float, dim: int) -> torch.Tensor:
    """RoPE frequencies as transformers' LlamaRotaryEmbedding makes them at init: on the CPU, in float32."""
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


def rebuild_rope_tables(model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    """Recompute every RoPE frequency vector and cos/sin table as stock LLaVA's builder leaves them.

    Stock: the model is instantiated on the CPU, where transformers computes the frequencies and the
    table in float32 and stores the table in the model dtype (the builder's float16); only then is it
    moved to the GPU. Casting the model (``.to(dtype)``) or rebuilding on the GPU changes those values
    (GPU cos/sin differ from the CPU's in the last bit, which fp16 rounding can keep). So: frequencies
    in float32 on the CPU, table on the CPU in float32, stored in ``dtype`` (default: the embeddings'),
    then moved to the module's device. In float32 this gives exact tables, not fp16-rounded ones.
    """
    if dtype is None:
        dtype = model.get_input_embeddings().weight.dtype
    cpu = torch.device("cpu")
    for module in model.modules():
        if hasattr(module, "_set_cos_sin_cache") and hasattr(module, "max_seq_len_cached"):
            device = module.inv_freq.device
            module.inv_freq = stock_inv_freq(module.base, module.dim)
            module._set_cos_sin_cache(module.max_seq_len_cached, cpu, dtype)
            module.to(device)


def conversation_prompt(text: str, has_image: bool, conv_mode: str, im_start_end: bool) -> str:
    """The full conversation prompt: the image placeholder, a newline, the question; then the assistant turn."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if has_image:
        placeholder = (DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
                       if im_start_end else DEFAULT_IMAGE_TOKEN)
        text = placeholder + "\n" + text
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def build_prompt(question: str, conv_mode: str = "vicuna_v1", *, mm_use_im_start_end: bool = False) -> str:
    """The prompt LLaVA's evaluation scripts build: image token, newline, question, in a conversation template
    (a question that holds the image token already keeps it where it is)."""
    from llava.constants import DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise ValueError(f"unknown conv_mode {conv_mode!r}; LLaVA knows {sorted(conv_templates)}.")
    return conversation_prompt(question, DEFAULT_IMAGE_TOKEN not in question, conv_mode, mm_use_im_start_end)


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
